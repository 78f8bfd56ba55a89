"""Exceptions with the exit codes the command line maps them to.

Exit codes (documented in the README):
  0  success
  1  a runtime failure (training diverged, a file could not be written, ...)
  2  bad usage or a bad configuration / argument
  3  bad input data: every item was rejected, or ``--strict`` saw a rejection
  4  a run folder, store or split that is missing, corrupt or does not match
  130  interrupted (Ctrl-C / SIGTERM; training saves a checkpoint first)
"""

from __future__ import annotations


class CmafnetError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CmafnetError, ValueError):
    """A configuration key, type or value is wrong."""

    exit_code = 2


class InputDataError(CmafnetError):
    """Input data is unusable (all files rejected, strict mode, empty folder)."""

    exit_code = 3


class RunFolderError(CmafnetError):
    """A run folder, store or split is missing, incomplete or inconsistent."""

    exit_code = 4
