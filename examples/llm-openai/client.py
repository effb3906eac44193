"""Chat with an OpenAI-compatible model through the sidecar, using the official openai client.

  python client.py                                   # one answer, then the same streamed
  python client.py --no-stream --logprobs            # a whole answer, judged by the gate
  python client.py --fault confidence=0.5 --logprobs # the demo model unsure: escalated
  python client.py --fault hold_after_first          # the demo model stalls mid-stream

The only change an application makes is `base_url`: the sidecar's proxy instead of the model
server. For each answer this prints what the sidecar said about it (`x-sidecar-outcome`, the
confidence, a review id, a fallback). `--fault SPEC` is passed to the demo model as
`x-demo-fault` (see `sidecar demo-model`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx
import openai
from openai import OpenAI

SIDECAR_HEADERS = (
    "x-sidecar-outcome",
    "x-sidecar-confidence",
    "x-sidecar-review-id",
    "x-sidecar-fallback",
    "x-sidecar-failure-mode",
)


def sidecar_says(headers: httpx.Headers) -> str:
    return " ".join(f"{name[10:]}={headers[name]}" for name in SIDECAR_HEADERS if name in headers)


def main() -> int:
    parser = argparse.ArgumentParser(description="Chat through the sidecar.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8700/v1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt", default="Say hello.")
    parser.add_argument("--fault", help="x-demo-fault for the demo model, e.g. hold_after_first")
    parser.add_argument("--logprobs", action="store_true", help="ask for logprobs (the gate)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-stream", action="store_true", help="only the whole answer")
    mode.add_argument("--stream-only", action="store_true", help="only the streamed answer")
    args = parser.parse_args()

    client = OpenAI(
        base_url=args.base_url,
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        # The sidecar retries what is safe to retry and falls back; retrying again here would
        # multiply the load on a model that is already in trouble.
        max_retries=0,
        timeout=httpx.Timeout(130.0, connect=5.0),
    )
    request = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "extra_headers": {"x-demo-fault": args.fault} if args.fault else None,
    }
    if args.logprobs:
        request["logprobs"] = True

    try:
        if not args.stream_only:
            raw = client.chat.completions.with_raw_response.create(**request)
            completion = raw.parse()
            print(f"answer: {completion.choices[0].message.content}")
            print(f"  sidecar: {sidecar_says(raw.headers)}")
        if not args.no_stream:
            started = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(stream=True, **request)
            print("stream: ", end="", flush=True)
            first = None
            for chunk in raw.parse():
                if first is None:
                    first = time.monotonic() - started
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print(f"\n  sidecar: {sidecar_says(raw.headers)}")
            print(f"  first chunk after {1000 * (first or 0):.0f}ms")
    except openai.APIError as exc:
        # A stream that broke after its first token ends with an error event: the client raises
        # it instead of returning a truncated answer that looks complete.
        print(f"\nerror: {exc.code or type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
