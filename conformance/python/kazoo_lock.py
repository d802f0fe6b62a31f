"""kazoo's Lock recipe, driven over stdin/stdout by the ZooKeeper interop test.

Python services lock with kazoo's ``Lock``, whose nodes are named
``{uuid hex}__lock__NNNNNNNNNN``. Given ``extra_lock_patterns=["-lock-"]`` it also
counts the nodes of Curator's layout (``_c_{uuid}-lock-NNNNNNNNNN``), which fencelock
uses, as contenders.

One command a line:
  acquire <millis>  ->  "acquired <path>" | "timeout"
  release           ->  "released"
  quit              ->  exits
Usage: python3 kazoo_lock.py <connect string> <lock path>
"""

import sys

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout
from kazoo.recipe.lock import Lock


def main():
    if len(sys.argv) != 3:
        print("usage: kazoo_lock.py <connect string> <lock path>", file=sys.stderr)
        sys.exit(2)
    hosts, path = sys.argv[1], sys.argv[2]
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30)
    lock = Lock(client, path, identifier="kazoo", extra_lock_patterns=["-lock-"])
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "acquire":
            try:
                # kazoo deletes its node when the wait times out.
                got = lock.acquire(timeout=int(words[1]) / 1000.0)
            except LockTimeout:
                got = False
            print(f"acquired {path}/{lock.node}" if got else "timeout", flush=True)
        elif words[0] == "release":
            lock.release()
            print("released", flush=True)
        elif words[0] == "quit":
            break
    client.stop()
    client.close()


if __name__ == "__main__":
    main()
