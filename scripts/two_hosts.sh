#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces nl-a (10.77.0.1) and nl-b (10.77.0.2) joined
# by a veth pair. mpirun runs in nl-a and starts the rank on nl-b through its rsh agent, here a
# wrapper that runs the command in nl-b (`ip netns exec`) instead of over ssh; the ranks talk
# over TCP between the namespaces. Trains the same run as 2 ranks on one host and checks that
# both give the same losses and weights, bit for bit.
#
# Needs root (ip netns), OpenMPI and normlab built with --features mpi.
# Usage: scripts/two_hosts.sh [WORKDIR]   (default: a fresh temporary folder)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NORMLAB_BIN:-$ROOT/target/release/normlab}
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

[ "$(id -u)" = 0 ] || { echo "error: run as root (ip netns needs it)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "error: $BIN missing; run: cargo build --release --features mpi" >&2; exit 1; }

cleanup() {
    ip netns del nl-a 2>/dev/null || true
    ip netns del nl-b 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add nl-a
ip netns add nl-b
ip link add veth-a netns nl-a type veth peer name veth-b netns nl-b
ip -n nl-a addr add 10.77.0.1/24 dev veth-a
ip -n nl-b addr add 10.77.0.2/24 dev veth-b
for ns in nl-a nl-b; do
    ip -n $ns link set lo up
done
ip -n nl-a link set veth-a up
ip -n nl-b link set veth-b up

# The rsh agent: "agent HOST COMMAND..." runs COMMAND on HOST, as ssh would (through a shell).
cat > "$WORK/netns-rsh" <<'AGENT'
#!/bin/sh
host=$1; shift
case $host in
    10.77.0.1) ns=nl-a ;;
    10.77.0.2) ns=nl-b ;;
    *) echo "netns-rsh: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
AGENT
chmod +x "$WORK/netns-rsh"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > "$WORK/hostfile"

TRAIN=(train --model seed-cnn --norm syncbn --train-limit 4000 --test-limit 1000 --epochs 2
       --batch-size 64 --threads 1)
rm -rf "$WORK/one-host" "$WORK/two-hosts"

echo "== 2 ranks on one host (shared memory)"
mpirun -n 2 --oversubscribe --bind-to none "$BIN" "${TRAIN[@]}" --out "$WORK/one-host"

echo "== 2 ranks on 2 hosts (TCP over the veth pair)"
ip netns exec nl-a mpirun -n 2 --hostfile "$WORK/hostfile" --bind-to none \
    --mca plm_rsh_agent "$WORK/netns-rsh" \
    --mca btl self,tcp --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
    "$BIN" "${TRAIN[@]}" --out "$WORK/two-hosts"

echo "== the same result?"
cmp <(cut -d, -f1-4 "$WORK/one-host/steps.csv") <(cut -d, -f1-4 "$WORK/two-hosts/steps.csv")
# The tensors (the data after the JSON header, whose metadata order varies from file to file).
tensors() { tail -c +$((9 + $(od -An -tu8 -N8 "$1"))) "$1"; }
cmp <(tensors "$WORK/one-host/model.safetensors") <(tensors "$WORK/two-hosts/model.safetensors")
echo "identical: every step's loss in steps.csv and model.safetensors, $(($(wc -l < "$WORK/one-host/steps.csv") - 1)) steps"
