"""Shared by every test module: Ctrl-C and SIGTERM as a terminal gives them."""
import signal

import pytest


@pytest.fixture(autouse=True)
def stop_signals_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt and SIGTERM has its default action, in this process and in the
    programs the tests start, as in a terminal, also where the suite itself was started with them
    ignored (`pytest &` from a script ignores SIGINT): the tests of the stop handlers would otherwise
    send their signals into the void."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
