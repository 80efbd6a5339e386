"""OpenAI clients against the control service's routing endpoint, run inside the LAN client's
namespace by tests/integration/test_control.py:

    python routing.py BASE_URL two MODEL_A MODEL_B     list the models; one chat with each
    python routing.py BASE_URL burst MODEL_A MODEL_B   20 requests at once, naming A and B in turn

The key comes from $LLAMAVM_KEY (never a command line). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main() -> int:
    base, mode, first, second = sys.argv[1:5]
    client = OpenAI(base_url=base, api_key=os.environ.get("LLAMAVM_KEY") or "none", timeout=600)
    if mode == "two":
        ids = [m.id for m in client.models.list().data]
        answers = []
        for name in (first, second):
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hello, who are you?"}]
            )
            message = reply.choices[0].message
            answers.append(
                {
                    "asked": name,
                    "model": reply.model,
                    "content": message.content,
                    "reasoning": getattr(message, "reasoning_content", None),
                }
            )
        print(json.dumps({"ids": ids, "answers": answers}))
        return 0

    def one(i: int) -> dict:
        name = (first, second)[i % 2]
        try:
            reply = client.completions.create(model=name, prompt="Hello", max_tokens=4)
            return {"i": i, "asked": name, "model": reply.model, "ok": True}
        except Exception as exc:
            return {"i": i, "asked": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
