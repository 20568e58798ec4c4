# Shared by scripts/run-local and scripts/test (sourced, not run): ports, root, Debian packages,
# and the two brokers the worker needs.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port NAME PORT [SECONDS]: until something listens on 127.0.0.1:PORT.
wait_port() {
    local name=$1 port=$2 seconds=${3:-120}
    for _ in $(seq 1 "$seconds"); do
        port_open "$port" && return 0
        sleep 1
    done
    echo "$name is not answering on 127.0.0.1:$port after ${seconds} s" >&2
    return 1
}

# as_root COMMAND...: as is when root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root for: $* (run as root or install sudo)" >&2
        return 1
    fi
}

# apt_install PACKAGE...: installs Debian/Ubuntu packages without letting their services start
# (they could take ports the tests use; the scripts start what they need themselves). The
# policy-rc.d that forbids it is removed afterwards only if this created it (container images
# often ship their own).
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "apt-get not found: install $* with your system's package manager" >&2
        return 1
    fi
    echo "installing $* (apt-get)"
    local created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local status=0
    {
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    } && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    if [ -n "$created_policy" ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
    return $status
}

# ensure_brokers: RabbitMQ on 5672 and Mosquitto on 1883, installed where missing, started
# where not running, waited for. Brokers already answering are left alone.
ensure_brokers() {
    local missing=()
    if ! port_open 5672 && ! command -v rabbitmq-server >/dev/null 2>&1 \
        && [ ! -x /usr/sbin/rabbitmq-server ]; then
        missing+=(rabbitmq-server)
    fi
    if ! port_open 1883 && ! command -v mosquitto >/dev/null 2>&1 \
        && [ ! -x /usr/sbin/mosquitto ]; then
        missing+=(mosquitto)
    fi
    # mosquitto_sub and mosquitto_pub, to watch what the worker publishes.
    if ! command -v mosquitto_sub >/dev/null 2>&1; then
        missing+=(mosquitto-clients)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}" || return 1
    fi
    # Debian puts both in /usr/sbin, which a non-root PATH may lack.
    PATH=$PATH:/usr/sbin
    if port_open 5672; then
        echo "RabbitMQ: already running on 127.0.0.1:5672"
    else
        echo "RabbitMQ: starting (rabbitmq-server -detached)"
        as_root rabbitmq-server -detached
    fi
    if port_open 1883; then
        echo "Mosquitto: already running on 127.0.0.1:1883"
    else
        echo "Mosquitto: starting"
        if [ -f /etc/mosquitto/mosquitto.conf ]; then
            as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
        else
            # Mosquitto 2's defaults: a listener on localhost:1883, anonymous clients allowed.
            as_root mosquitto -d
        fi
    fi
    wait_port RabbitMQ 5672
    wait_port Mosquitto 1883
    # The port opens a moment before RabbitMQ accepts logins; best effort (needs its cookie).
    as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
}

require_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust first (https://rustup.rs), then run $0 again" >&2
        exit 1
    fi
}
