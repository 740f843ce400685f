"""The exceptions an onnxruntime call can raise, for `except ORT_ERRORS`.

onnxruntime's own exceptions (Fail, InvalidArgument, InvalidGraph, ...) share no base class below
Exception, and some failures arrive as a plain RuntimeError. Export verification and the server
catch the same set, taken from the installed onnxruntime so that a release adding a kind is
covered.
"""

from __future__ import annotations

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    *(kind for kind in vars(_ort_state).values() if isinstance(kind, type) and issubclass(kind, Exception)),
)
