#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind, for a proxy in
# front of memcached at a fixed request rate. Throughput and CPU time move
# by 10-20 % between runs on a shared machine; this count moves by about
# 1 %, so it shows a change of a few percent in the proxy's own work (it
# leaves out the kernel: compare system calls with `perf stat`).
#
#   benches/instructions.sh MEMTIER [TARGET...]
#
# TARGET is `memdial` (one node over memcached; the default), `twemproxy`
# (nutcracker over memcached, one server connection), `eventual` (node 1
# of three `memdial serve` processes over a memcached each; node 1 is
# counted) or `replica` (the same cluster, node 2 counted: what applying
# node 1's writes costs a replica, per request node 1 served). The memdial
# binary is $MEMDIAL_BIN, else target/release/memdial; it runs with its
# default log level (info), as a user runs it.
# memtier_benchmark runs 50 connections, 1 set : 10 gets, 32-byte values on
# 2,000 keys, each connection at $RATE requests per second (20) for
# $REQUESTS requests (200), at pipeline depth $DEPTH (1); the count starts
# after a prefill and covers the load alone. valgrind and nutcracker are
# installed from Debian when missing. Results and commands are recorded in
# docs/BENCHMARKS.md.
set -euo pipefail

memtier=${1:?usage: benches/instructions.sh MEMTIER [memdial|twemproxy|eventual|replica ...]}
shift
targets=("${@:-memdial}")
memdial=${MEMDIAL_BIN:-target/release/memdial}
depth=${DEPTH:-1}
rate=${RATE:-20}
requests=${REQUESTS:-200}
conns=50

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need valgrind valgrind
need memcached memcached
[[ " ${targets[*]} " == *" twemproxy "* ]] && need nutcracker nutcracker

work=$(mktemp -d /tmp/memdial-instructions.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}
memcached_on() { memcached -p "$1" -U 0 -t 2 -m 256 -u root & pids+=($!); wait_port "$1"; }

# Runs the load on `port` against the process `vg` (valgrind); prints the
# instructions per request.
count() {
    local name=$1 port=$2 vg=$3 out=$4
    "$memtier" -s 127.0.0.1 -p "$port" --protocol=memcache_text -t 1 -c 10 -d 32 \
        --key-maximum=2000 --key-pattern=P:P --requests=allkeys -n allkeys --ratio=1:0 \
        --hide-histogram >/dev/null 2>&1
    sleep 1
    callgrind_control -z "$vg" >/dev/null 2>&1
    local totals
    totals=$("$memtier" -s 127.0.0.1 -p "$port" --protocol=memcache_text -t 1 -c $conns \
        --ratio=1:10 -d 32 --key-maximum=2000 --pipeline="$depth" --rate-limiting="$rate" \
        --requests="$requests" --hide-histogram 2>/dev/null | grep Totals)
    callgrind_control -d "$vg" >/dev/null 2>&1
    sleep 0.5
    local dump instructions
    dump=$(ls -t "$out".* | head -1)
    instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    printf '%-10s depth %-2s %7d instructions per request (%s instructions, %d requests; memtier ops/s %s)\n' \
        "$name" "$depth" $((instructions / (conns * requests))) "$instructions" \
        $((conns * requests)) "$(echo "$totals" | awk '{print int($2)}')"
}

for target in "${targets[@]}"; do
    out="$work/$target.out"
    case $target in
    memdial | twemproxy)
        mc=$(free_port)
        memcached_on "$mc"
        port=$(free_port)
        if [[ $target == memdial ]]; then
            valgrind --tool=callgrind --callgrind-out-file="$out" "$memdial" serve \
                --listen "127.0.0.1:$port" --admin "127.0.0.1:$(free_port)" \
                --backend "127.0.0.1:$mc" >"$work/$target.log" 2>&1 &
        else
            printf 'bench:\n  listen: 127.0.0.1:%s\n  hash: fnv1a_64\n  distribution: ketama\n  preconnect: true\n  server_connections: 1\n  auto_eject_hosts: false\n  servers:\n    - 127.0.0.1:%s:1\n' \
                "$port" "$mc" >"$work/nutcracker.yml"
            valgrind --tool=callgrind --callgrind-out-file="$out" nutcracker \
                --conf-file "$work/nutcracker.yml" --output "$work/nutcracker.log" \
                --stats-port "$(free_port)" >"$work/$target.log" 2>&1 &
        fi
        vg=$!
        pids+=("$vg")
        wait_port "$port"
        count "$target" "$port" "$vg" "$out"
        ;;
    eventual | replica)
        counted=1
        [[ $target == replica ]] && counted=2
        config="$work/cluster.yaml"
        printf 'cluster:\n  name: instructions\n  secret: instructions-secret\n  consistency: eventual\n  data_dir: %s/data\nnodes:\n' "$work" >"$config"
        ports=()
        for n in 1 2 3; do
            client=$(free_port)
            ports+=("$client")
            printf '  - id: %s\n    client: 127.0.0.1:%s\n    internal: 127.0.0.1:%s\n    admin: 127.0.0.1:%s\n' \
                "$n" "$client" "$(free_port)" "$(free_port)" >>"$config"
        done
        for n in 1 2 3; do
            mc=$(free_port)
            memcached_on "$mc"
            if [[ $n == "$counted" ]]; then
                valgrind --tool=callgrind --callgrind-out-file="$out" "$memdial" serve \
                    --config "$config" --node "$n" --backend "127.0.0.1:$mc" >"$work/node$n.log" 2>&1 &
                vg=$!
                pids+=("$vg")
            else
                "$memdial" serve --config "$config" --node "$n" \
                    --backend "127.0.0.1:$mc" >"$work/node$n.log" 2>&1 &
                pids+=($!)
            fi
        done
        for p in "${ports[@]}"; do wait_port "$p"; done
        # Let the links come up before the prefill.
        sleep 3
        count "$target" "${ports[0]}" "$vg" "$out"
        ;;
    *)
        echo "unknown target $target (memdial, twemproxy, eventual, replica)" >&2
        exit 2
        ;;
    esac
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
done
