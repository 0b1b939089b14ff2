"""The one audit core: a reference run against a candidate run, for any backend.

A **backend** decodes prompts and reports each step (token, runner-up, top-1 and top-2
logits or logprobs): the local model (:mod:`.local`) or an OpenAI-compatible server
(:mod:`.remote`). A **condition** says how a run happens: alone, in a generate-style padded
batch, under a decode policy, with requests in flight, with a warm prompt cache. ``scan``
and ``verify`` (:mod:`mgaudit.scan`, :mod:`mgaudit.verify`) compare the reference (a
backend alone) with the candidate (a backend under a condition), free-running and
teacher-forced (:mod:`.compare`), classify every difference as rounding noise or an
anomaly (:mod:`.severity`), and write traces (:mod:`.tracedir`) or a report
(:mod:`mgaudit.formats.report`). Reference runs are decoded once and reused
(:mod:`.refcache`).

| module | one job |
|---|---|
| ``steps`` | the step records every backend returns, the request sent, the decoding settings |
| ``conditions`` | how a run happens (alone, padded, policy, in flight, warm cache) |
| ``backend`` | the backend interface; opening the candidate and reference backends of a job |
| ``local`` | the local model as a backend |
| ``remote`` | an OpenAI-compatible server as a backend (requests, load, teacher-forced scoring) |
| ``refcache`` | reference runs decoded once per (identity, prompt, settings) |
| ``compare`` | per-sequence records and differences of a reference and a candidate run |
| ``severity`` | within noise or anomalous: the classification and its summary |
| ``tracedir`` | the trace directory: manifest, resume, overwrite rule, unit files |
"""
