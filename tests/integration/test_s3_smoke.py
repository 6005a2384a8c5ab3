import torch

from clt_core.data.store import ActivationStore


def test_store_round_trip_on_s3(s3_url: str) -> None:
    store = ActivationStore.create(s3_url, num_layers=2, d_model=4, rows_per_chunk=8)
    x = torch.randn(20, 2, 4)
    with store.writer() as w:
        w.append(x, -x, torch.arange(20))
    again = ActivationStore.open(s3_url)
    assert again.num_rows == 20
    assert torch.equal(again.read(0, 20).targets, (-x).to(torch.bfloat16))
