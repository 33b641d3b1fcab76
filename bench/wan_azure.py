#!/usr/bin/env python3
"""Azurite helpers for bench/wan.sh: `key` prints the emulator's well-known account key;
`create-container PORT NAME` creates a container with a SharedKey-signed request (our tool, like
object_store, does not create containers)."""
import base64
import datetime
import hashlib
import hmac
import http.client
import sys

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def create_container(port, name):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
    version = "2023-11-03"
    path = f"/{ACCOUNT}/{name}"
    to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
               f"/{ACCOUNT}{path}\nrestype:container")
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest())
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
            c.request("PUT", f"{path}?restype=container", headers={
                "x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
                "Authorization": f"SharedKey {ACCOUNT}:{sig.decode()}"})
            r = c.getresponse()
            if r.status not in (201, 409):
                sys.exit(f"creating container {name}: {r.status} {r.read()[:200]!r}")
            return
        except ConnectionError:
            import time
            time.sleep(0.2)
    sys.exit("azurite did not come up")


if __name__ == "__main__":
    if sys.argv[1] == "key":
        print(KEY)
    else:
        create_container(sys.argv[2], sys.argv[3])
