"""Which failures a retry can fix. Jobs retry steps (`operations.max_retries`) for transient
trouble (a busy GPU, a dropped MLflow connection); bad input fails at once instead, as a
`dagster.Failure` that forbids retries, so a wrong path is reported in seconds, not after
three attempts.

Whatever leaves a step goes through `redaction.redact`: Dagster records an error's message and
those of its causes, so the cause chained to a Failure is a masked copy (`redact_exception`), and
an error of any other kind whose text holds a credential is re-raised as a (retryable) Failure
with the masked text."""

import functools
import re

import dagster as dg

from dfkd_assets.redaction import redact, redact_exception


def _permanent_types() -> tuple[type, ...]:
    # imported when an error happens (the modules are loaded by then); definitions stay torch-free
    from dfkd_assets.artifacts import StaleSnapshot
    from dfkd_assets.config import ConfigError
    from dfkd_assets.core.distill import CorruptCheckpoint, DistillDiverged
    from dfkd_assets.core.evaluation import EvalDataError
    from dfkd_assets.core.io import ShardError
    from dfkd_assets.core.prompts import PromptBankMismatch, PromptError
    from dfkd_assets.core.rounds import CapError
    from dfkd_assets.core.teacher import PromptNotEncodable, TeacherLoadError
    from dfkd_assets.core.vocabulary import ClassNameError, NotAnEmbeddingStudent
    from dfkd_assets.core.vqgan import GeneratorLoadError
    from dfkd_assets.core.weights import WeightsReadError
    from dfkd_assets.defs.registry import LegacyModelError, WrongWeights
    from dfkd_assets.registry_model import IntegrityError

    return (ConfigError, TeacherLoadError, GeneratorLoadError, EvalDataError, PromptError, PromptBankMismatch, DistillDiverged,
            ShardError, WeightsReadError, PromptNotEncodable, FileNotFoundError, LegacyModelError, IntegrityError,
            ClassNameError, NotAnEmbeddingStudent, CapError, CorruptCheckpoint, WrongWeights, StaleSnapshot)


def no_retry_for_bad_input(fn):
    """Asset decorator (under @dg.asset): errors caused by settings or files become non-retryable Failures."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except dg.Failure:
            raise
        except Exception as e:
            if isinstance(e, _permanent_types()):
                raise dg.Failure(description=redact(f"{type(e).__name__}: {e}"), allow_retries=False) from redact_exception(e)
            unreachable = _tracking_unreachable(e)
            if unreachable is not None:
                raise unreachable from redact_exception(e)
            if holds_secret(e):  # retried as before, but recorded masked
                raise dg.Failure(description=redact(f"{type(e).__name__}: {e}"), allow_retries=True) from redact_exception(e)
            raise

    return wrapper


def holds_secret(e: BaseException) -> bool:
    """True when the message of `e` or of any error in its cause chain holds something `redact` masks."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if redact(str(e)) != str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


_API_FAILURE = re.compile(r"API request to (?P<base>https?://[^/\s]+)\S* failed with exception")
_REASON = re.compile(r"\[Errno -?\d+\] [^'\")]+|Read timed out|Connection aborted")


def _tracking_unreachable(e: BaseException):
    """An MLflow client error that means "the tracking server did not answer", restated so the
    step's error names the server and says what to do; None for any other error.

    MLflow reports an outage as a generic MlflowException whose message buries the server under
    an endpoint URL and urllib3's retry text; the step is retried either way (transient)."""
    from dfkd_assets.defs.resources import TrackingUnavailable

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        m = _API_FAILURE.search(str(e))
        if m:
            reason = _REASON.search(str(e))
            return TrackingUnavailable(redact(
                f"MLflow tracking server {m['base']} is unreachable ({reason.group(0) if reason else 'no answer'}); "
                "start it or fix mlflow.tracking_uri: the step is retried up to operations.max_retries times"
            ))
        e = e.__cause__ or e.__context__
    return None
