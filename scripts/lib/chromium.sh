# shellcheck shell=bash
# Headless Chromium for the browser tests (tests/it/cors.rs): installed from
# Debian packages when /usr/bin/chromium is missing (scripts/lib/apt.sh). The tests find the binary in INGESTD_TEST_CHROMIUM
# (default /usr/bin/chromium) and fail, naming this script, when it is absent.

# shellcheck source-path=SCRIPTDIR source=apt.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/apt.sh"

# Idempotent: does nothing (and prints nothing) when chromium is present.
chromium_ensure_installed() {
    apt_ensure chromium.sh chromium chromium "${INGESTD_TEST_CHROMIUM:-/usr/bin/chromium}"
}
