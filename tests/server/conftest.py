"""Server tests: each module starts the real ``tokenmill serve`` (``fixture.py``).

When a test fails, the log of every server still running, or stopped during that test, is
attached to its report (section "server log"), so a connection error or a 500 comes with
the server's side of the story.
"""

from __future__ import annotations

import pytest

from tests.server.fixture import LIVE_SERVERS, STOPPED_SERVERS

LOG_TAIL = 12000  # characters of each server's log


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in [*LIVE_SERVERS, *STOPPED_SERVERS]:
            report.sections.append((f"server log ({server.base_url} {' '.join(server.args)})",
                                    server.log(LOG_TAIL)))
    if call.when == "teardown":
        STOPPED_SERVERS.clear()
