"""Start the Q-Zoom endpoint on a local, loopback-only Ray and keep it up until Ctrl-C.

    .venv/bin/python jobs/serve.py                      # embedded tiny model, CPU, port 8000
    .venv/bin/python jobs/serve.py --config my.yaml     # a ServeArgs YAML (the `args:` block)

For a cluster use `serve deploy configs/serve.yaml` instead.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML holding ServeArgs; default: CPU args on the embedded model")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-auth", action="store_true", help="disable bearer auth (loopback tests only)")
    opts = parser.parse_args()

    from qzoom_ray.serve.config import ServeArgs
    from qzoom_ray.serve.local import local_cpu_args, start_local, stop_local

    args = ServeArgs.from_yaml(opts.config) if opts.config else local_cpu_args()
    if opts.no_auth:
        args = args.model_copy(update={"auth": args.auth.model_copy(update={"enabled": False})})
    token = None
    if args.auth.enabled:
        env = args.auth.token_env
        if not os.environ.get(env):
            # Must be set before Ray starts: the replicas inherit this process's environment.
            os.environ[env] = secrets.token_urlsafe(24)
            print(f"${env} was not set; generated a token for this run: {os.environ[env]}")
        token = os.environ[env].split(",")[0]
    try:
        url = start_local(args, port=opts.port, num_cpus=opts.num_cpus)
        auth = f' -H "Authorization: Bearer {token}"' if token else ""
        print(f"\nQ-Zoom endpoint ready at {url}  (OpenAI base_url: {url}/v1, model: {args.model_name})\n")
        print(
            "Example:\n"
            f'  IMG=$(base64 -w0 your.png)\n  curl -s {url}/v1/chat/completions{auth} -H "Content-Type: application/json" \\\n'
            f'    -d "{{\\"model\\": \\"{args.model_name}\\", \\"max_tokens\\": 16, \\"messages\\": [{{\\"role\\": \\"user\\", '
            f'\\"content\\": [{{\\"type\\": \\"text\\", \\"text\\": \\"What is the total?\\"}}, {{\\"type\\": \\"image_url\\", '
            f'\\"image_url\\": {{\\"url\\": \\"data:image/png;base64,$IMG\\"}}}}]}}]}}"\n'
        )
        print("Ctrl-C to stop.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_local()


if __name__ == "__main__":
    main()
