"""POST one small txt2img to a WebUI API, save the PNG, print the time and the infotext."""

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request


def txt2img(url: str, payload: dict, timeout: float = 1800) -> dict:
    """The API's answer to one txt2img request."""
    req = urllib.request.Request(
        url + "/sdapi/v1/txt2img", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:7863")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--alwayson", default="", help="alwayson_scripts as JSON")
    ap.add_argument("--out", default="/tmp/neo-e2e/last.png")
    a = ap.parse_args()
    payload = {
        "prompt": "a photo of a cat",
        "negative_prompt": "",
        "width": a.size,
        "height": a.size,
        "steps": a.steps,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "cfg_scale": a.cfg,
        "seed": 1,
    }
    if a.alwayson:
        payload["alwayson_scripts"] = json.loads(a.alwayson)
    t = time.time()
    try:
        body = txt2img(a.url, payload)
    except urllib.error.HTTPError as e:
        print(f"HTTP {e.code}: {e.read().decode()[:2000]}")
        return 1
    png = base64.b64decode(body["images"][0])
    with open(a.out, "wb") as f:
        f.write(png)
    ok = png[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"txt2img {a.size}x{a.size} {a.steps} steps: {time.time() - t:.1f}s, PNG={ok}, {len(png)} bytes -> {a.out}")
    print("infotext:", json.loads(body["info"])["infotexts"][0].replace("\n", " | "))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
