"""The web console (``/ui``) in a real browser: Debian's headless Chromium, driven by selenium
through Debian's chromedriver (nothing is downloaded), against a deployment with API keys on,
so the login is real. An operator logs in, finds a deferred message in the queue browser,
retries it from its page and sees it delivered; the dashboard draws its charts and refreshes
itself; a wrong key is refused. The browser is waited on for elements (WebDriverWait), the
system for events (``eventually``), never for a time.

``ZMTA_SCREENSHOT=1`` saves the dashboard to ``docs/console.png`` (the README's picture).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.test_outcomes import queued_id
from tests.support import Deployment, DeploymentFactory, eventually
from zmta_api.security import scope_for
from zmta_common.store import DeliveryRow

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium package
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver package
# Headless, and nothing that reaches for the network: without these Chromium stalls on lookups.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1080",
]
ADMIN_KEY = "zmta_console-admin-key-for-tests"
SEND_KEY = "zmta_console-send-key-for-tests"
SENDER = "sender@b.test"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
WAIT = 30  # seconds an element may take to appear (the pages refresh every 5 s)


def key_entry(name: str, key: str, scopes: list[str]) -> dict[str, Any]:
    return {"name": name, "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(), "scopes": scopes}


@pytest.fixture(scope="module")
async def console(module_deploy: DeploymentFactory) -> Deployment:
    keys = [key_entry("ops", ADMIN_KEY, ["admin"]), key_entry("app", SEND_KEY, ["send"])]
    # One retry an hour: a deferred delivery stays deferred until the operator retries it.
    return await module_deploy(
        {"api": {"open_access": False, "keys": keys}, "zones": {"default": {"defer_times": [3600]}}}
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: the console's browser tests need Debian's chromium and "
            "chromium-driver packages (make setup installs them)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """Wait until the condition holds in the browser (WebDriverWait polls the page for it);
    after WAIT seconds, fail with what the page shows."""
    try:
        # The pages redraw themselves every few seconds: an element found just before may be gone.
        return WebDriverWait(driver, WAIT, ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        try:
            showing = driver.find_element(By.TAG_NAME, "body").text[:4000]
        except WebDriverException as exc:
            showing = f"(unreadable: {exc.msg})"
        raise AssertionError(f"no {what} after {WAIT} s at {driver.current_url}; the page shows:\n{showing}") from None


def shown(driver: WebDriver, css: str) -> WebElement:
    """The element, once it is in the page and visible."""
    element: WebElement = until(driver, ec.visibility_of_element_located((By.CSS_SELECTOR, css)), css)
    return element


def text_of(driver: WebDriver, css: str) -> str:
    """The text of the element, once it is there with some."""
    return str(until(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).text, css))


def click(driver: WebDriver, css: str) -> None:
    """Click the element, once it is there (again if the page redrew it just before)."""

    def clicked(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    until(driver, clicked, f"a click on {css}")


def submit_key(driver: WebDriver, d: Deployment, key: str) -> None:
    driver.get(f"{d.api_url}/ui/#/login")
    field = shown(driver, "#api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "login-submit").click()


def log_in(driver: WebDriver, d: Deployment) -> None:
    submit_key(driver, d, ADMIN_KEY)
    shown(driver, "body:not(.signed-out) #nav")  # past the login page


async def send(d: Deployment, rcpts: list[str], subject: str) -> str:
    data = f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return queued_id(await asyncio.to_thread(d.smtp_send, SENDER, rcpts, data))


async def deferred(d: Deployment, message_id: str) -> list[DeliveryRow]:
    return [row for row in await d.store.deliveries_of(message_id) if row.attempts and not row.leased]


def test_only_the_console_files_are_public() -> None:
    for public in ("/ui", "/ui/", "/ui/index.html", "/ui/console.js", "/ui/console.css", "/health"):
        assert scope_for(public) is None, public
    for guarded in ("/ui/../zones", "/ui/x/console.js", "/uix", "/ui/.js", "/ui/console.py", "/log", "/zones"):
        assert scope_for(guarded) == "admin", guarded


async def test_the_files_are_served_without_a_key_and_the_api_still_needs_one(console: Deployment) -> None:
    async with httpx.AsyncClient(base_url=console.api_url) as client:
        assert (await client.get("/ui")).headers["location"].endswith("/ui/")
        page = await client.get("/ui/")
        assert page.status_code == 200 and '<script type="module" src="console.js">' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "set-cookie" not in page.headers  # no cookie: nothing a forged request could carry
        script = await client.get("/ui/console.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        # Data goes into the page as text: no HTML is ever parsed from a string.
        assert not re.search(r"\.(inner|outer)HTML\s*[+]?=|insertAdjacentHTML|document\.write|DOMParser", script.text)
        assert (await client.get("/ui/missing.js")).status_code == 404
        for path in ("/zones", "/log", "/log/stats"):
            assert (await client.get(path)).status_code == 401, path


async def test_the_login_page_refuses_a_wrong_key(browser: WebDriver, console: Deployment) -> None:
    browser.get(f"{console.api_url}/ui/#/login")
    browser.execute_script("sessionStorage.clear()")
    submit_key(browser, console, "zmta_not-the-key")
    until(browser, ec.text_to_be_present_in_element((By.ID, "login-error"), "not valid"), "the refusal")
    assert browser.current_url.endswith("#/login")
    assert browser.execute_script("return sessionStorage.getItem('zmta.apiKey')") is None
    submit_key(browser, console, SEND_KEY)  # a valid key, without the admin scope
    until(browser, ec.text_to_be_present_in_element((By.ID, "login-error"), "no 'admin' scope"), "the refusal")
    # Without a key, a page of the console leads to the login page.
    browser.get(f"{console.api_url}/ui/#/queue")
    until(browser, ec.url_contains("#/login"), "the login page")


async def test_a_deferred_message_is_retried_from_its_page(
    browser: WebDriver, console: Deployment, sinks: dict
) -> None:
    sink = sinks["127.0.0.2"]
    sink.handler.scripted_rcpt["later@a.test"] = ["451 4.3.0 <later@a.test>: try again later"] * 3
    message_id = await send(console, ["later@a.test"], "deferred")
    (row,) = await eventually(lambda: deferred(console, message_id), what="the delivery deferred")

    log_in(browser, console)
    browser.get(f"{console.api_url}/ui/#/queue?zone=default&state=deferred")
    click(browser, f'#queue-list tr[data-id="{message_id}"] a')
    delivery = text_of(browser, f'#deliveries tr[data-seq="{row.seq}"][data-status="DEFERRED"]')
    assert "451 4.3.0 <later@a.test>: try again later" in delivery
    assert "later@a.test" in text_of(browser, "#envelope-panel dl")
    assert "Subject: deferred" in text_of(browser, "#headers")

    sink.handler.scripted_rcpt.clear()  # the server takes it now
    click(browser, f'button[data-action="retry"][data-seq="{row.seq}"]')
    await eventually(lambda: [m for m in sink.messages if m.rcpt_tos == ["later@a.test"]], what="the retried delivery")
    shown(browser, "#gone")  # the page, refreshing itself, sees the message leave the queue
    # What the log says of it (GET /log?id=): each delivery's outcome, and every event.
    shown(browser, f'#outcomes tr[data-seq="{row.seq}"][data-outcome="delivered"]')
    log = "#message-log tbody tr"
    actions = until(
        browser, lambda d: [e.get_attribute("data-action") for e in d.find_elements(By.CSS_SELECTOR, log)], log
    )
    assert actions == ["QUEUED", "DEFERRED", "ACCEPTED"]


async def test_the_dashboard_draws_its_charts_and_refreshes_itself(
    browser: WebDriver, console: Deployment, sinks: dict
) -> None:
    # Traffic for the charts: mail delivered to two domains, a refusal and a deferral.
    sinks["127.0.0.2"].handler.scripted_rcpt["gone@a.test"] = ["550 5.1.1 <gone@a.test>: User unknown"]
    sinks["127.0.0.3"].handler.scripted_rcpt["busy@b.test"] = ["451 4.7.1 <busy@b.test>: busy, try later"] * 3
    for rcpts in (["one@a.test", "two@a.test"], ["three@b.test"], ["four@a.test"], ["gone@a.test"]):
        await send(console, rcpts, "traffic")
    busy = await send(console, ["busy@b.test"], "traffic")
    await eventually(lambda: deferred(console, busy), what="the deferral")
    wanted = {"one@a.test", "two@a.test", "three@b.test", "four@a.test"}
    a_sink, b_sink = sinks["127.0.0.2"], sinks["127.0.0.3"]
    await eventually(
        lambda: wanted <= {r for m in a_sink.messages + b_sink.messages for r in m.rcpt_tos}, what="the deliveries"
    )

    log_in(browser, console)
    browser.get(f"{console.api_url}/ui/#/")
    assert text_of(browser, '#queue-table tr[data-zone="default"]').startswith("default")
    shown(browser, 'svg[data-chart="queue"] rect[data-series="deferred"]')
    until(browser, ec.text_to_be_present_in_element((By.ID, "domains-table"), "a.test"), "the top domains")
    # This hour's bars in the default zone's chart: one of each series.
    bars = 'svg[data-chart="hourly"][data-zone="default"] rect[data-series]'
    every = {"queued", "delivered", "deferred", "bounced"}
    until(
        browser,
        lambda d: {e.get_attribute("data-series") for e in d.find_elements(By.CSS_SELECTOR, bars)} == every,
        bars,
    )
    until(browser, ec.text_to_be_present_in_element((By.ID, "categories-table"), "recipient_unknown"), "the categories")
    # It refreshes by itself: the time of the last update moves on.
    before = browser.find_element(By.ID, "updated").text
    until(browser, lambda d: d.find_element(By.ID, "updated").text not in ("", before), "a refresh")
    if os.environ.get("ZMTA_SCREENSHOT"):
        browser.save_screenshot(str(SCREENSHOT))
