"""Shared by every test module: Ctrl-C and SIGTERM as a terminal gives them, and no torchrun
variables from the environment."""
import os
import signal

import pytest

# set by torchrun, or by a cluster's job for its processes: train.py and evaluate.py would start a
# process group from them (and wait for the other ranks), and only rank 0 prints
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_torchrun_variables(monkeypatch):
    """Each test starts as a plain `python` process, also where the suite runs inside a cluster job
    that set torchrun's variables; the tests of DDP set their own (they reach the programs the
    tests start, too)."""
    for name in [*TORCHRUN_VARIABLES, *(k for k in os.environ if k.startswith("TORCHELASTIC_"))]:
        monkeypatch.delenv(name, raising=False)


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
