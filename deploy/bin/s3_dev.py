"""The development S3-compatible server (service ``s3`` in docker-compose.yml, profile ``s3``).

Runs moto's server mode (``python -m moto.server``) over HTTPS with the certificate that
bootstrap.py issued from the development CA (``/var/lib/s3/tls``), waits until it accepts
connections, creates the bucket (``--bucket``; a provisioned bucket, as a tenant's real one
would be), then stays in the foreground until it is stopped; SIGTERM and SIGINT stop the
server. Storage is in memory: a development and test stand-in for S3, never for data that
must survive. Any credentials are accepted.

Container paths are ``--root`` + the path, as in bootstrap.py (``${CT_ROOT:-}``).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_WAIT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="", help="prefix of every container path (CT_ROOT)")
    parser.add_argument("--listen", default="0.0.0.0:9000", metavar="HOST:PORT")
    parser.add_argument("--bucket", default="ct-data")
    args = parser.parse_args(argv)
    tls = Path(f"{args.root.rstrip('/')}/var/lib/s3/tls")
    host, _, port = args.listen.rpartition(":")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", port,
                               "-c", str(tls / "s3.pem"), "-k", str(tls / "s3.key")])

    stopping = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + START_WAIT_S
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - compared, not bound
    while True:
        if server.poll() is not None:
            raise SystemExit(f"s3: the server exited with status {server.returncode}")
        try:
            socket.create_connection((probe, int(port)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.terminate()
                raise SystemExit(f"s3: not listening after {START_WAIT_S:.0f} s") from None
            time.sleep(0.1)
    import botocore.session
    from botocore.config import Config

    client = botocore.session.Session().create_client(
        "s3", region_name="us-east-1", endpoint_url=f"https://{probe}:{port}",
        # the development server accepts any credentials; these are not secrets
        verify=str(tls / "ca.pem"), aws_access_key_id="dev",
        aws_secret_access_key="dev",  # noqa: S106
        config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=args.bucket)
    print(f"s3: serving https://{args.listen} with bucket {args.bucket}", flush=True)
    status = server.wait()
    return 0 if stopping else status


if __name__ == "__main__":
    sys.exit(main())
