"""The CLI's filter of known-harmless library warnings (stagerl/quiet.py) drops exactly the listed
messages: the same loggers' other messages, errors, and everything under --verbose pass."""

from __future__ import annotations

import logging
import warnings

import pytest

from stagerl import quiet


@pytest.fixture
def restore_filters():
    saved = {name: list(logging.getLogger(name).filters) for name, _, _ in quiet.LOG_MESSAGES}
    # An in-process CLI test earlier in the session may have installed the filter already: start
    # each test without it, so "before install()" really means before.
    for name in saved:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, quiet._DropMessages)]
    with warnings.catch_warnings():
        yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


def _emitted(caplog, logger: str, level: int, msg: str) -> bool:
    caplog.clear()
    logging.getLogger(logger).log(level, msg)
    return any(r.getMessage() == msg for r in caplog.records)


def test_listed_log_message_dropped_others_kept(restore_filters, caplog):
    name = "torch.utils.cpp_extension"
    noise = "No CUDA runtime is found, using CUDA_HOME='/usr/local'"
    with caplog.at_level(logging.WARNING, logger=name):
        assert _emitted(caplog, name, logging.WARNING, noise)  # before: shown
        quiet.install()
        quiet.install()  # idempotent: one filter
        assert sum(isinstance(f, quiet._DropMessages) for f in logging.getLogger(name).filters) == 1
        assert not _emitted(caplog, name, logging.WARNING, noise)
        assert _emitted(caplog, name, logging.WARNING, "Error building extension 'cpu_adam'")
        assert _emitted(caplog, name, logging.ERROR, noise)  # an error is never hidden


def test_tied_lm_head_save_message_dropped_another_shared_tensor_kept(restore_filters, caplog):
    name = "accelerate.utils.other"
    tied = ("[RANK 0] Removed shared tensor {'model.lm_head.weight'} while saving. This should be "
            "OK, but check by verifying that you don't receive any warning while reloading")
    other = tied.replace("model.lm_head.weight", "model.vision.proj.weight")
    quiet.install()
    with caplog.at_level(logging.WARNING, logger=name):
        assert not _emitted(caplog, name, logging.WARNING, tied)
        assert _emitted(caplog, name, logging.WARNING, other)


def test_listed_warning_dropped_others_kept(restore_filters):
    quiet.install()
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)
    assert [str(w.message) for w in seen] == ["`torch.distributed.something_else` is deprecated.",
                                              "`torch.distributed.all_gather_into_tensor` is "
                                              "deprecated"]


def test_verbose_installs_nothing(restore_filters, caplog):
    name = "torch.utils.cpp_extension"
    logging.getLogger(name).filters[:] = []
    quiet.install(verbose=True)
    assert not logging.getLogger(name).filters
