"""Money: what bounds an answer's length is what the reservation assumed, whatever the client wrote.

Against the fake that bills as OpenAI does (tests/fakes/billing_upstream.py).
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from chat_api.app import create_app
from chat_api.config import Settings
from tests.fakes.billing_upstream import BillingUpstream
from tests.keys.conftest import MASTER, auth, make_key
from tests.servers import ServerThread


def _spent(url: str, key_id: str) -> Decimal:
    usage = httpx.get(url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER))
    return Decimal(str(usage.json()["totals"]["cost_usd"]))


@pytest.mark.parametrize("client", ["aiohttp", "sdk"])
def test_a_null_max_completion_tokens_does_not_lift_max_tokens(
    upstream: tuple[BillingUpstream, str], tmp_path: Path, client: str
) -> None:
    """`max_tokens: 10` with `max_completion_tokens: null` on a reasoning model.

    Before: 10 output tokens were reserved, then the null was sent on as the model's
    limit (none): 4 calls wrote 65,536 tokens each, $3.15 on a $0.01 budget.
    """
    fake, url = upstream
    settings = Settings(
        openai_api_key=fake.api_key,
        openai_base_url=url,
        upstream_retries=0,
        upstream_client=client,
        master_key=MASTER,
        models=("o1-mini",),
        default_model="o1-mini",
        database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
    )
    with ServerThread(create_app(settings)) as gateway:
        secret, key_id = make_key(gateway.url, budget_usd="0.01")
        body = {
            "model": "o1-mini",
            "max_tokens": 10,
            "max_completion_tokens": None,
            "messages": [{"role": "user", "content": "write"}],
        }
        codes = [
            httpx.post(
                gateway.url + "/v1/chat/completions", json=body, headers=auth(secret), timeout=30
            ).status_code
            for _ in range(4)
        ]
        assert codes == [200] * 4
        assert [bill.completion_tokens for bill in fake.biller.bills] == [10] * 4
        assert fake.biller.total <= Decimal("0.01")
        deadline = time.monotonic() + 10
        while _spent(gateway.url, key_id) < fake.biller.total:
            assert time.monotonic() < deadline, "the ledger never caught up"
            time.sleep(0.1)
        assert _spent(gateway.url, key_id) == pytest.approx(fake.biller.total, abs=Decimal("1e-6"))
