"""Shared test setup."""

import io
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on one thread: the test models are tiny, their forwards drown in
    intra-op synchronisation on a busy 2-core machine, and subprocesses that tests compare bit
    for bit run with OMP_NUM_THREADS=1 too."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # in-process `dfm` calls keep one thread too
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(autouse=True)
def piped_stdin(monkeypatch):
    """The CLI reads a piped prompt from stdin; give every test an empty pipe."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


#: The longest files, run first: the suite runs on one worker per core (pytest-xdist, a file per
#: worker at a time), and a long file started last would leave the other cores idle at the end.
LONGEST_FIRST = ("test_equivalence.py", "test_reliability.py", "test_bench.py", "test_trainer.py", "test_scaling.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order
