"""The server's observation points, for metrics and logs: one class of no-op hooks.

The server calls these at the moments an operator cares about; a metrics exporter subclasses
ServerObserver and overrides what it records. Keep overrides cheap and non-blocking: batch hooks
run on a model's worker thread between onnxruntime runs, the others on the event loop. A hook
should not raise: the batcher logs an exception from a batch hook and carries on (the batch's
answers have already gone), but one from an event-loop hook reaches the code that called it.
"""

from __future__ import annotations

from collections.abc import Sequence


class ServerObserver:
    """Hooks with empty bodies; subclass and override the ones you need."""

    # ----- worker threads --------------------------------------------------------------------

    def batch_completed(
        self,
        model: str,
        version: int,
        rows: int,
        tokens: int,
        padded_tokens: int,
        queue_waits_s: Sequence[float],
        compute_s: float,
    ) -> None:
        """A run succeeded: `rows` sessions, `tokens` real tokens (`padded_tokens` = rows x width);
        `queue_waits_s` has the submit-to-first-run wait of each request that started here."""

    def batch_failed(self, model: str, version: int, rows: int) -> None:
        """A run raised; its requests were answered with INTERNAL."""

    # ----- event loop ------------------------------------------------------------------------

    def session_opened(self, model: str, version: int) -> None:
        """A session was created (CreateSession, Stream open, a Generate's own session)."""

    def session_ended(self, model: str, version: int, reason: str) -> None:
        """A session is gone: reason is "closed", "expired" or "evicted"."""

    def tokens_processed(self, model: str, version: int, tokens_in: int, tokens_out: int) -> None:
        """A request finished: tokens consumed by the model, tokens generated or sampled."""

    def model_loaded(self, model: str, version: int, providers: Sequence[str]) -> None:
        """A model version is serving, with these onnxruntime providers."""

    def model_refused(self, path: str, reason: str) -> None:
        """A version in the repository could not be served (the reason is also logged)."""

    def model_unloaded(self, model: str, version: int) -> None:
        """A retired model version's last session ended and its engine was released."""

    def session_restored(self, model: str, version: int, source: str) -> None:
        """A session came back from saved state (source "snapshot"); session_opened counts it too."""

    def snapshot_written(self, path: str, sessions: int, size_bytes: int, seconds: float) -> None:
        """The session snapshot was saved (periodically or at shutdown)."""

    def snapshot_failed(self, path: str, reason: str) -> None:
        """The session snapshot could not be saved (the reason is also logged)."""

    def state_store_operation(self, operation: str, outcome: str, seconds: float) -> None:
        """A state store (Redis) call finished: operation "save", "save_many", "load" or "delete";
        outcome "ok", "miss", "corrupt", "failed" or "skipped"; seconds it took (0 when skipped)."""

    def state_store_availability(self, available: bool) -> None:
        """True when the state store is created and when it answers again; False at a failure."""
