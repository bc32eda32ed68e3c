"""The hook call's hot path: what happens around the answer (not the rules)."""
from __future__ import annotations

from tests.helpers import request_body


def test_a_hook_calls_objects_are_freed_after_the_answer_is_written(client, monkeypatch):
    """The parsed body and the call's result live until the server closes the response (after sending it):
    their freeing is not part of the latency the EHR sees."""
    from cds_hooks_service import api

    freed = []

    class Sentinel:
        def __del__(self):
            freed.append(True)

    real = api.call_service

    def call_service(*args, **kwargs):
        result = real(*args, **kwargs)
        result.sentinel = Sentinel()
        return result

    monkeypatch.setattr(api, "call_service", call_service)
    response = client.post("/cds-services/migraine-med-safety-sign", json=request_body(), buffered=False)
    assert response.status_code == 200
    assert freed == []  # answered, not yet closed: still held
    response.close()
    assert freed == [True]
