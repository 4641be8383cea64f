"""meta-memcache (PyPI), a meta-protocol client, doing its normal work
against one server: get/set/delete, CAS, add/append/replace modes, counters,
touch, multi-get, binary and long keys, large values, and its herd controls
(leases on a miss, recache before expiry, stale-while-revalidate).

Usage: meta_memcache_check.py PORT
"""

import sys

from meta_memcache import (
    CacheClient,
    LeasePolicy,
    RecachePolicy,
    ServerAddress,
    SetMode,
    StalePolicy,
    connection_pool_factory_builder,
)
from meta_memcache.protocol import Key


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


def main():
    port = int(sys.argv[1])
    client = CacheClient.cache_client_from_servers(
        servers=[ServerAddress(host="127.0.0.1", port=port)],
        connection_pool_factory_fn=connection_pool_factory_builder(
            recv_timeout=5, read_buffer_size=1 << 20
        ),
    )

    check(client.set("k", "v", ttl=100), "set")
    check(client.get("k") == "v", "get")
    check(client.get("missing") is None, "get miss")
    check(client.set("obj", {"a": [1, 2]}, ttl=0), "set object")
    check(client.get("obj") == {"a": [1, 2]}, "get object")
    check(client.touch("k", ttl=50), "touch")
    check(not client.touch("missing", ttl=50), "touch miss")

    # CAS
    value, cas = client.get_cas("k")
    check(value == "v" and cas, "get_cas")
    check(client.set("k", "w", ttl=100, cas_token=cas), "set with the right cas")
    check(not client.set("k", "x", ttl=100, cas_token=cas), "set with a stale cas")
    check(client.get("k") == "w", "value after cas")

    # modes
    check(not client.set("k", "y", ttl=0, set_mode=SetMode.ADD), "add over a live key")
    check(client.set("fresh", "y", ttl=0, set_mode=SetMode.ADD), "add")
    check(not client.set("nothing", "y", ttl=0, set_mode=SetMode.REPLACE), "replace miss")
    check(client.set("fresh", "z", ttl=0, set_mode=SetMode.REPLACE), "replace")
    check(client.get("fresh") == "z", "value after replace")

    # delete / invalidate
    check(client.delete("fresh"), "delete")
    check(client.get("fresh") is None, "deleted")
    check(client.invalidate("fresh"), "invalidate a missing key")

    # counters
    check(client.delta_initialize("n", delta=1, initial_value=10, initial_ttl=100),
          "delta_initialize creates")
    check(client.delta_and_get("n", delta=5) == 15, "delta_and_get")
    check(client.delta("n", delta=-3), "negative delta")
    check(client.delta_and_get("n", delta=0) == 12, "value after decrement")
    check(client.delta_and_get("nope", delta=1) is None, "delta on a miss")
    check(client.delta_initialize_and_get("m", delta=2, initial_value=7, initial_ttl=0) == 7,
          "delta_initialize_and_get creates at the initial value")

    # multi-get, binary and long keys, a large value
    keys = [f"multi-{i}" for i in range(20)]
    for i, key in enumerate(keys):
        client.set(key, i, ttl=0)
    got = client.multi_get(keys + ["absent"])
    check(all(got[Key(k)] == i for i, k in enumerate(keys)), "multi_get values")
    check(got[Key("absent")] is None, "multi_get miss")
    for key in ["with space", "ключ", "tab\there", "x" * 240]:
        check(client.set(key, key, ttl=0), f"set {key[:20]!r}")
        check(client.get(key) == key, f"get {key[:20]!r}")
    big = "b" * 500_000
    check(client.set("big", big, ttl=0), "set large")
    check(client.get("big") == big, "get large")

    # leases: the first miss wins the lease (a miss), the value is filled.
    lease = LeasePolicy(ttl=30, miss_retries=1, miss_retry_wait=0.05)
    check(client.get_or_lease("leased", lease_policy=lease) is None, "lease winner misses")
    check(client.set("leased", "filled", ttl=100), "fill after lease")
    check(client.get_or_lease("leased", lease_policy=lease) == "filled", "lease filled")

    # recache: with less TTL left than the policy, one client wins (a miss)
    # and the others keep the value.
    client.set("hot", "old", ttl=10)
    recache = RecachePolicy(ttl=30)
    first = client.get("hot", recache_policy=recache)
    second = client.get("hot", recache_policy=recache)
    check(first is None and second == "old", f"recache: {first!r} {second!r}")

    # stale-while-revalidate: invalidation marks stale; the next reader
    # wins the recache (a miss), others see the stale value.
    stale = StalePolicy(mark_stale_on_deletion_ttl=30)
    client.set("sw", "v1", ttl=100)
    check(client.delete("sw", stale_policy=stale), "delete marking stale")
    first = client.get("sw")
    second = client.get("sw")
    check(first is None and second == "v1", f"stale: {first!r} {second!r}")
    check(client.set("sw", "v2", ttl=100), "refill after stale")
    check(client.get("sw") == "v2", "fresh value after stale")

    print("all checks passed")


main()
