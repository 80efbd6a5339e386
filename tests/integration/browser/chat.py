"""Chat through the llama.cpp web UI in headless Chromium (Debian's, driven by Selenium).

Run inside the LAN client's namespace by tests/integration/test_expose.py:

    python chat.py URL SCREENSHOT [MESSAGE]

Loads the page, waits for the app's message box, sends MESSAGE, waits until a reply appears
below it, saves a screenshot, and prints one JSON line: {"title", "reply", "console_errors"}.
Exit 1 (with the reason on stderr and a screenshot of the state) when any step doesn't happen.
"""

from __future__ import annotations

import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys


def browser(height: int = 900) -> webdriver.Chrome:
    """Debian's headless Chromium, its console log kept."""
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", f"--window-size=1280,{height}"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> int:
    url, shot = sys.argv[1], sys.argv[2]
    message = sys.argv[3] if len(sys.argv) > 3 else "Hello from the LAN"
    driver = browser()
    try:
        return chat(driver, url, shot, message)
    finally:
        driver.quit()


def wait(what: str, predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except WebDriverException:
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


#: The API key, when the server wants one (from the environment: never on a command line).
KEY = os.environ.get("LLAMAVM_UI_KEY", "")
asked: list[bool] = []


def _button(driver: webdriver.Chrome, label: str):
    return next(
        (b for b in driver.find_elements(By.TAG_NAME, "button")
         if b.is_displayed() and label.lower() in b.text.lower()),
        None,
    )  # fmt: skip


def enter_key(driver: webdriver.Chrome) -> None:
    """Answer the web UI's "Access denied — Enter API Key" as a user would."""
    asked.append(True)
    _button(driver, "Enter API Key").click()

    def visible_field():
        fields = [e for e in driver.find_elements(By.TAG_NAME, "input") if e.is_displayed()]
        return next((e for e in fields if e.get_attribute("type") in ("password", "text")), None)

    field = wait("the API key field", visible_field, timeout=15)
    field.send_keys(KEY)
    field.send_keys(Keys.ENTER)
    save = next(
        (b for b in driver.find_elements(By.TAG_NAME, "button")
         if b.is_displayed() and b.text.strip().lower() in ("save", "connect", "ok", "submit")),
        None,
    )  # fmt: skip
    if save is not None:
        save.click()


def chat(driver: webdriver.Chrome, url: str, shot: str, message: str) -> int:
    try:
        driver.get(url)

        def ready():
            """The message box, or the key prompt (then answered, once)."""
            box = next(
                (e for e in driver.find_elements(By.TAG_NAME, "textarea") if e.is_displayed()),
                None,
            )
            if box is not None:
                return box
            if KEY and not asked and _button(driver, "Enter API Key"):
                enter_key(driver)
            return None

        box = wait("the message box", ready)
        before = driver.find_element(By.TAG_NAME, "body").text
        box.click()
        box.send_keys(message)
        box.send_keys(Keys.ENTER)

        def reply() -> str | None:
            text = driver.find_element(By.TAG_NAME, "body").text
            if message not in text:
                return None
            after = text.split(message, 1)[1].strip()
            grown = len(text) - len(before) - len(message)
            return after if grown > 20 and after else None

        answer = wait("a reply below the message", reply, timeout=90)
        time.sleep(1)  # let the stream finish painting
        driver.save_screenshot(shot)
    except (TimeoutError, WebDriverException) as exc:
        driver.save_screenshot(shot)
        print(f"browser: {exc}", file=sys.stderr)
        print(driver.find_element(By.TAG_NAME, "body").text[-2000:], file=sys.stderr)
        return 1
    errors = [
        entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"
    ]
    print(json.dumps({"title": driver.title, "reply": answer[:500], "console_errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
