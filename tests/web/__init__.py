"""The web dashboard in a real browser: headless Chromium (Debian's) driven by Playwright
against the whole gateway (`egressd serve` in-process), through the public REST API only."""
