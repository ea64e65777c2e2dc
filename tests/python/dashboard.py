#!/usr/bin/env python3
"""Osprey's /dashboard in a real browser: Debian's Chromium, headless, through chromedriver.

Opens the page (with HTTP Basic credentials when given, as a person would type them into the
browser's prompt), waits for its first update, checks that the expected nodes and tenants are
shown, that the figures move while the server is under load, and keeps a screenshot.

Usage: dashboard.py --url http://HOST:PORT/dashboard --screenshot PNG
                    [--user NAME --key KEY] [--node NAME ...] [--tenant NAME ...]
"""

import argparse
import os
import shutil
import time
import urllib.parse

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from checks import check, finish


def find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise SystemExit(f"none of {names} is installed (apt-get install chromium chromium-driver)")


def wait_for(what, predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.2)
    check(False, f"timed out after {timeout_s:.0f} s waiting for {what}")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--user")
    ap.add_argument("--key")
    ap.add_argument("--node", action="append", default=[])
    ap.add_argument("--tenant", action="append", default=[])
    a = ap.parse_args()

    opts = webdriver.ChromeOptions()
    opts.binary_location = find("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=find("chromedriver")), options=opts)
    try:
        url = a.url
        if a.key:
            u = urllib.parse.urlsplit(url)
            cred = f"{urllib.parse.quote(a.user or 'admin')}:{urllib.parse.quote(a.key)}@"
            url = urllib.parse.urlunsplit((u.scheme, cred + u.netloc, u.path, u.query, u.fragment))
        driver.get(url)
        check(driver.title == "Osprey", f"page title: {driver.title!r}")
        updates = lambda: int(driver.execute_script("return document.body.dataset.updates || 0"))
        wait_for("the first update", lambda: updates() >= 1)
        conn = driver.execute_script("return document.getElementById('conn').textContent")
        check(conn == "live", f"connection status: {conn!r}")

        # The page redraws every second: read in one script call, never through element
        # handles that a redraw makes stale.
        def attrs(selector, attr):
            return driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.getAttribute(arguments[1]))",
                selector, attr)
        nodes = lambda: set(attrs("#nodes tr[data-node]", "data-node"))
        for n in a.node:
            wait_for(f"node {n} in the nodes table", lambda: n in nodes())
        tenants = lambda: set(attrs("#tenants tr[data-tenant]", "data-tenant"))
        for t in a.tenant:
            check(t in tenants(), f"tenant {t} in the tenants table: {sorted(tenants())}")

        # The figures move: answers are counted, and the variant chart gains areas.
        fig = lambda: driver.execute_script("return document.getElementById('fig-answered').textContent")
        first = fig()
        moved = wait_for("the answers figure to move", lambda: fig() not in (first, "–", "0") and fig())
        check(bool(moved), f"answers figure stayed at {first!r}")
        areas = lambda: attrs("#chart-variants path", "d")
        wait_for("the variant-mix chart to draw", lambda: len(areas()) >= 1)
        check(len(attrs("#chart-attainment path", "d")) >= 1, "the SLO attainment chart draws a line")
        d0 = areas()
        wait_for("the variant-mix chart to change", lambda: areas() != d0)
        before = updates()
        wait_for("two more updates", lambda: updates() >= before + 2)
        os.makedirs(os.path.dirname(os.path.abspath(a.screenshot)), exist_ok=True)
        check(driver.save_screenshot(a.screenshot), "screenshot saved")
        print(f"answers {first} -> {fig()}; nodes {sorted(nodes())}; tenants {sorted(tenants())}; "
              f"screenshot {a.screenshot}")
    finally:
        driver.quit()
    finish(" (dashboard)")


if __name__ == "__main__":
    main()
