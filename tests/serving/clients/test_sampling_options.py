"""Sampling options reach the server as the client set them: unset fields stay unset on the wire."""

from __future__ import annotations

from contract.sampling import Sampling
from serving.clients.client import sampling_options
from serving.frontend.servicer import sampling_fields


def test_the_client_and_the_server_read_the_same_options_back() -> None:
    for options in (Sampling(), Sampling(temperature=0.0), Sampling(top_k=3, top_p=0.5, seed=7)):
        assert sampling_fields(sampling_options(options)) == options


def test_unset_fields_are_not_sent() -> None:
    wire = sampling_options(Sampling(top_k=2))
    assert not wire.HasField("temperature") and not wire.HasField("top_p") and not wire.HasField("seed")
    assert wire.top_k == 2
