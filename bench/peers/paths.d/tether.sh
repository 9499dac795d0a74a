# paths.d/tether.sh - tether as a path of the peers harness (sourced by run.sh).
#
#   tether      one tether-server and one tether-agent over QUIC (mutual TLS, TLS 1.3)
#   tether-tcp  the same over the TCP fallback (TLS 1.3 over TCP, yamux)
#
# The agent listens on LP_ECHO (its apiserver listener, relayed to the echo server) and on
# LP_IPERF (`--forward LP_IPERF=iperf`, relayed by the server's `--service iperf=...`). Memory
# and CPU count both processes: the node end and the control-plane end.
#
# Binaries: $TETHER_BIN_DIR if set, else the repository's target/release next to this file
# (build with `cargo build --release --bins`), else tether-server/tether-agent on PATH.
# Linked into another copy of the harness (ln -s .../bench/peers/paths.d/tether.sh paths.d/),
# it still finds the repository's build; copied, it needs TETHER_BIN_DIR or PATH.

TETHER_PATHS_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")

tether_bin() { # NAME -> path of the binary
    local name=$1 d
    for d in "${TETHER_BIN_DIR:-}" "$TETHER_PATHS_DIR/../../../target/release"; do
        [[ -n $d && -x $d/$name ]] && { echo "$d/$name"; return 0; }
    done
    command -v "$name" && return 0
    log "$name not found: set TETHER_BIN_DIR or run cargo build --release --bins"
    return 1
}

# tether_start WORKDIR UP_IPERF UP_ECHO TRANSPORT OFFSET
tether_start() {
    local w=$1 up_iperf=$2 up_echo=$3 transport=$4 off=$5 server agent
    server=$(tether_bin tether-server) || return 1
    agent=$(tether_bin tether-agent) || return 1
    local sport=$((PORT_BASE + off)) sadmin=$((PORT_BASE + off + 3)) aadmin=$((PORT_BASE + off + 4))
    LP_IPERF=$((PORT_BASE + off + 1)); LP_ECHO=$((PORT_BASE + off + 2))
    rm -rf "$w/server" "$w/agent"
    # The agent dials 127.0.0.1: the certificate must name it (init puts only the host name in).
    "$server" init --data-dir "$w/server" --san 127.0.0.1 >"$w/init.log" 2>&1 || return 1
    "$server" issue-agent --data-dir "$w/server" --node-name bench-node --out-dir "$w/agent" \
        >>"$w/init.log" 2>&1 || return 1
    start_bg "$w/server.log" "$server" --log-level warn run --data-dir "$w/server" \
        --listen "127.0.0.1:$sport" --upstream "127.0.0.1:$up_echo" \
        --service "iperf=127.0.0.1:$up_iperf" --admin "127.0.0.1:$sadmin"
    local server_pid=$LAST_PID
    wait_listen "$sadmin" 10 || return 1
    start_bg "$w/agent.log" "$agent" --log-level warn run --data-dir "$w/agent" \
        --server "127.0.0.1:$sport" --transport "$transport" \
        --listen "127.0.0.1:$LP_ECHO" --forward "127.0.0.1:$LP_IPERF=iperf" --admin "127.0.0.1:$aadmin"
    MEM_TARGETS=("agent=$LAST_PID" "server=$server_pid")
}

path_tether_start() { tether_start "$1" "$2" "$3" quic 40; }
path_tether_version() { echo "$("$(tether_bin tether-server)" --version) (QUIC)"; }

path_tether_tcp_start() { tether_start "$1" "$2" "$3" tcp 50; }
path_tether_tcp_version() { echo "$("$(tether_bin tether-server)" --version) (TLS over TCP, yamux)"; }
