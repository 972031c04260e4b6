"""The load test's HTTP calls: ``POST /v1/embeddings`` and ``/v1/features`` on random batches, as the
gRPC clients send them, with the same deadline (``X-Request-Timeout``) and the same checks."""

from __future__ import annotations

import base64
import json
import random
from typing import Callable

import numpy as np

from serving.http_json import tensor_from_json

Check = Callable[[str, np.ndarray, np.ndarray], bool]


class HttpRefused(Exception):
    """An HTTP answer other than 200: the gRPC status name of its error body and its message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class WrongAnswer(Exception):
    pass


class HttpCalls:
    """HTTP calls on random batches of ``images`` (``pngs`` their files) to the API at ``url``."""

    def __init__(self, url: str, images: np.ndarray, pngs: list[bytes], cls: np.ndarray, tokens: np.ndarray,
                 check: Check, deadline_s: float, max_batch: int) -> None:
        self.url, self.images, self.cls, self.tokens, self.check = url, images, cls, tokens, check
        self.b64 = [base64.b64encode(p).decode() for p in pngs]
        self.deadline_s, self.max_batch = deadline_s, max_batch

    async def _post(self, session, route: str, body: dict) -> dict:
        import aiohttp

        headers = {"Content-Type": "application/json", "X-Request-Timeout": str(self.deadline_s)}
        try:
            async with session.post(f"{self.url}/v1/{route}", data=json.dumps(body), headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=self.deadline_s + 5)) as r:
                answer = json.loads(await r.read())
                if r.status != 200:
                    raise HttpRefused(answer["error"]["code"], f"HTTP {r.status}: {answer['error']['message']}")
                return answer
        except TimeoutError:
            raise HttpRefused("DEADLINE_EXCEEDED", "the client's timeout passed") from None

    def _idx(self, rng: random.Random) -> list[int]:
        return [rng.randrange(len(self.images)) for _ in range(rng.randint(1, self.max_batch))]

    async def embeddings(self, session, rng: random.Random) -> int:
        idx = self._idx(rng)
        encoding = rng.choice(["float", "base64"])
        answer = await self._post(session, "embeddings", {"input": [f"data:image/png;base64,{self.b64[i]}" for i in idx],
                                                          "encoding_format": encoding})
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if encoding == "base64"
                else np.asarray(d["embedding"], np.float32) for d in answer["data"]]
        if not self.check("HTTP embeddings", np.stack(rows), self.cls[idx]):
            raise WrongAnswer
        return len(idx)

    async def features(self, session, rng: random.Random) -> int:
        idx = self._idx(rng)
        images = [{"encoded": self.b64[i]} if rng.random() < 0.3 else
                  {"raw": {"data": base64.b64encode(self.images[i].tobytes()).decode(), "height": 28, "width": 28,
                           "channels": 1}} for i in idx]
        answer = await self._post(session, "features", {"images": images, "layout": "TOKENS", "include_cls": True})
        ok = self.check("HTTP features", tensor_from_json(answer["features"]), self.tokens[idx]) and \
            self.check("HTTP features.cls", tensor_from_json(answer["cls"]), self.cls[idx])
        if not ok:
            raise WrongAnswer
        return len(idx)
