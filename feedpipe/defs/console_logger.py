"""The console logger for runs started from a terminal: Dagster's default, minus stack traces.

A step that fails on bad input raises `dg.Failure` with a message naming the file, the column and the rows;
Dagster's default console logger prints that message followed by the stack trace, which buries it and is no use
to whoever fixes the data. For a `dg.Failure` this logger prints the message and leaves the stack trace in the
run's event log (the structured event is untouched; only this console line is shortened). Any other exception is
a bug and keeps its stack trace here too. Same config as
Dagster's `colored_console_logger` (`log_level`, `name`), so run config written for that one still applies.
"""

import logging
import sys

import dagster as dg

_STACK_MARKER = "\nStack Trace:"
_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class _MessageWithoutStackFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not _is_explained_failure(record):
            return text  # any other exception is a bug: its stack trace stays
        head, marker, _ = text.partition(_STACK_MARKER)
        return head.rstrip() + ("\n(stack trace: in the run's event log)" if marker else "")


def _is_explained_failure(record: logging.LogRecord) -> bool:
    """The event carries a `dg.Failure`: raised on purpose, with a message meant for whoever reads the log."""
    event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
    error = getattr(getattr(event, "event_specific_data", None), "error", None)
    return getattr(error, "cls_name", None) in _EXPLAINED


# A failed blocking check is an outcome with its own message too (which check, on which asset), not a bug.
_EXPLAINED = ("Failure", "DagsterAssetCheckFailedError")
# Checked when a run is launched: an unknown level failed the logger's start, with a traceback, and left the
# run NOT_STARTED in the run history for good. Either case, as Dagster's own console logger takes it.
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL = dg.Enum("ConsoleLogLevel", [dg.EnumValue(v) for level in _LEVELS for v in (level, level.lower())])


@dg.logger(
    {
        "log_level": dg.Field(LOG_LEVEL, is_required=False, default_value="INFO",
                              description=f"The logger's threshold: one of {', '.join(_LEVELS)} (either case)."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
    },
    description="Console logger that prints failures' messages without their stack traces.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    log = logging.getLogger(f"feedpipe.console.{init_context.logger_config['name']}")
    log.setLevel(init_context.logger_config["log_level"].upper())
    log.propagate = False
    log.handlers.clear()  # one handler per run, however many runs this process starts
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MessageWithoutStackFormatter(_FORMAT))
    log.addHandler(handler)
    return log
