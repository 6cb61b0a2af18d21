"""Prepare a hubserver data directory for a bench run; print the tokens as JSON.

    python -m bench.server.hubprep DATA_DIR SITES [SUBJECTS]

Creates the development key, mints a hub token for the subscriber and a
publish token for the publisher, and makes the subscriber Site Admin of every
site. With SUBJECTS > 1 there are that many subscriber subjects (each Site
Admin of every site, one hub token each in ``hub_tokens``), so that a run can
stay under the server's per-subject connection limit. Every grant goes in
one transaction of the permission store (one commit for thousands of
sites; an older hubserver without ``grant_many`` gets one per grant). It runs as a
subprocess from the hubserver source being measured (its working
directory), so the bench itself never imports that hubserver.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.server.publisher import site_name

SUBSCRIBER = "bench-subscriber"
PUBLISHER = "bench-publisher"
TOKEN_TTL_SECONDS = 6 * 3600.0


def main(argv: list[str]) -> None:
    from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
    from hubserver.auth import ensure_dev_key
    from hubserver.permissions import Role, SqlitePermissionStore

    data_dir, sites = Path(argv[0]), int(argv[1])
    subjects = [subject_name(index) for index in range(int(argv[2]) if len(argv) > 2 else 1)]
    key = ensure_dev_key(data_dir)
    now = time.time()
    hub_tokens = [key.mint(subject, [HUB_SCOPE], TOKEN_TTL_SECONDS, now) for subject in subjects]
    publish_token = key.mint(PUBLISHER, [PUBLISH_SCOPE], TOKEN_TTL_SECONDS, now)
    grants = [
        (site_name(index), subject, Role.SITE_ADMIN)
        for subject in subjects
        for index in range(sites)
    ]
    with SqlitePermissionStore.open(data_dir) as store:
        if hasattr(store, "grant_many"):
            store.grant_many(grants)  # one transaction: thousands of sites in one commit
        else:  # an older hubserver (``--hubserver-src``): one transaction per grant
            for grant in grants:
                store.grant(*grant)
    print(
        json.dumps(
            {"hub_token": hub_tokens[0], "hub_tokens": hub_tokens, "publish_token": publish_token}
        )
    )


def subject_name(index: int) -> str:
    """The subscriber subject ``index`` (the first is ``SUBSCRIBER`` itself)."""
    return SUBSCRIBER if index == 0 else f"{SUBSCRIBER}-{index + 1}"


if __name__ == "__main__":
    main(sys.argv[1:])
