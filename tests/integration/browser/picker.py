"""Switch models by clicking on the control service's picker page, in headless Chromium
(Debian's, driven by Selenium). Run inside the LAN client's namespace by
tests/integration/test_control.py:

    python picker.py URL SCREENSHOT MODEL

Loads the page, gives it the API key ($LLAMAVM_UI_KEY) when it asks, clicks MODEL's Switch
button, waits for progress lines and the outcome, then for the page to say MODEL serves; saves a
screenshot and prints one JSON line: {"progress": [...], "serving": ..., "console_errors": [...]}.
Exit 1 (reason on stderr, screenshot of the state) when a step doesn't happen.
"""

from __future__ import annotations

import json
import os
import sys

from selenium.webdriver.common.by import By

# The chat test's browser and waiting helper, from the same folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chat import browser, wait


def main() -> int:
    url, shot, model = sys.argv[1:4]
    driver = browser(height=1000)
    try:
        driver.get(url)
        key = os.environ.get("LLAMAVM_UI_KEY", "")
        if key:
            box = wait(
                "the key prompt", lambda: driver.find_element(By.ID, "keybox").is_displayed()
            )
            assert box
            driver.find_element(By.ID, "key").send_keys(key)
            driver.find_element(By.ID, "savekey").click()
        button = wait(
            f"{model}'s Switch button",
            lambda: next(
                (b for b in driver.find_elements(By.CSS_SELECTOR, "button[data-switch]")
                 if b.get_attribute("data-switch") == model and b.is_enabled()),
                None,
            ),
        )  # fmt: skip
        button.click()
        progress = driver.find_element(By.ID, "progress")
        wait("the outcome", lambda: progress.get_attribute("data-outcome"), timeout=300)
        lines = [d.text for d in progress.find_elements(By.TAG_NAME, "div")]
        if progress.get_attribute("data-outcome") != "ok":
            raise RuntimeError(f"the switch failed: {lines}")
        serving = driver.find_element(By.ID, "serving")
        wait(f"the page to say {model} serves",
             lambda: serving.get_attribute("data-active") == model, timeout=30)  # fmt: skip
        driver.save_screenshot(shot)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(json.dumps({"progress": lines, "serving": serving.text, "console_errors": errors}))
        return 0
    except Exception as exc:
        driver.save_screenshot(shot)
        print(f"picker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
