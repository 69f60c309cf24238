#!/bin/sh
# vmferry lab guest /init (busybox sh, PID 1 of a disk-less initramfs).
#
# Identity comes from the kernel command line:
#   vmferry.name=NAME  vmferry.ip=CIDR  [vmferry.gw=ADDR]  [vmferry.workload=MIBPS]
#   [vmferry.memcheck=MIB]   fill MIB of memory with known patterns and verify them for ever
#                            (while dirtying them at vmferry.workload MiB/s), printing
#                            "VMFERRY-MEMCHECK pass=P blocks=N failures=F" after every pass
#                            and "VMFERRY-MEMCHECK-FAIL ..." for every block found changed
# Services: HTTP on 80 and 8080 (page "vmferry guest NAME port P"), TCP echo on 7, and on
# TCP 9 a control port that makes the guest itself open a session to a client (the guest as
# the connection's originator, for tests of firewall state that moves); send one line:
#   "tcp HOST PORT"   connect, say "VMFERRY-HELLO NAME", then echo what arrives, for ever
#   "udp HOST PORT"   TFTP-read the file NAME from HOST:PORT, discarded (UDP lockstep:
#                     a server that never ends the file keeps the exchange going)
#   "icmp HOST"       ping HOST 5 times a second
#   "addr add|del CIDR [GW|none|keep] [MAC]"   take or drop an address on eth0, or on the
#                     NIC with MAC (brought up: a NIC hot-plugged for a move by "dual" NIC,
#                     controller/dual_nic.py), and set, remove or keep the default route, then
#                     announce the addresses it keeps: how the guest changes subnet on a
#                     move across a boundary by NAT (controller/nat.py) or dual NIC
# and it answers "VMFERRY-TALK started ..." or "VMFERRY-TALK error ...".
# Prints "VMFERRY-READY name=NAME ip=CIDR" on the console once networking is up, or
# "VMFERRY-ERROR ..." when something it needs fails.
#
# For tests on the build host: VMFERRY_CMDLINE overrides /proc/cmdline and
# "init.sh --print-config" only parses it and prints the result.

export PATH=/bin

parse_cmdline() {
    NAME=guest IP= GW= WORKLOAD=0 MEMCHECK=0
    for word in $1; do
        case "$word" in
            vmferry.name=*) NAME=${word#vmferry.name=} ;;
            vmferry.ip=*) IP=${word#vmferry.ip=} ;;
            vmferry.gw=*) GW=${word#vmferry.gw=} ;;
            vmferry.workload=*) WORKLOAD=${word#vmferry.workload=} ;;
            vmferry.memcheck=*) MEMCHECK=${word#vmferry.memcheck=} ;;
        esac
    done
    case "$WORKLOAD" in
        ''|*[!0-9]*) echo "VMFERRY-ERROR bad vmferry.workload=$WORKLOAD, using 0"; WORKLOAD=0 ;;
    esac
    case "$MEMCHECK" in
        ''|*[!0-9]*) echo "VMFERRY-ERROR bad vmferry.memcheck=$MEMCHECK, using 0"; MEMCHECK=0 ;;
    esac
}

# Memory integrity, the way QEMU's own migration tests check it: a region of 1 MiB blocks,
# each holding one of four random patterns whose checksums are known; every block is verified
# over and over, and (at RATE MiB/s) rewritten with the next pattern, so a page that a
# migration lost or sent stale shows up as a block whose checksum is not its pattern's.
# The expected state (pattern per block, failure count) lives in shell variables, i.e. in the
# same guest memory that migrates. Arguments: MIB RATE DIR [PASSES] (PASSES: stop after that
# many passes, for tests on the build host; 0: never stop).
memcheck() {
    mib=$1 rate=$2 dir=$3 passes=${4:-0}
    [ "$mib" -lt 1 ] && mib=1
    for p in 0 1 2 3; do
        dd if=/dev/urandom of="$dir/memcheck-p$p" bs=1M count=1 2>/dev/null
        sum=$(md5sum < "$dir/memcheck-p$p")
        eval "SUM_$p=${sum%% *}"
    done
    b=0
    while [ $b -lt "$mib" ]; do
        dd if="$dir/memcheck-p$((b % 4))" of="$dir/memcheck-region" bs=1M count=1 seek=$b \
            conv=notrunc 2>/dev/null
        eval "GEN_$b=$((b % 4))"
        b=$((b + 1))
    done
    echo "VMFERRY-MEMCHECK start blocks=$mib rate=$rate"
    pass=0 failures=0 budget=0 last=$(centiseconds)
    while [ "$passes" -eq 0 ] || [ $pass -lt "$passes" ]; do
        b=0
        while [ $b -lt "$mib" ]; do
            eval "gen=\$GEN_$b"
            eval "want=\$SUM_$gen"
            got=$(dd if="$dir/memcheck-region" bs=1M count=1 skip=$b 2>/dev/null | md5sum)
            got=${got%% *}
            if [ "$got" != "$want" ]; then
                failures=$((failures + 1))
                echo "VMFERRY-MEMCHECK-FAIL pass=$pass block=$b pattern=$gen want=$want got=$got"
                # Re-arm the block so one corruption is reported once, not on every pass.
                dd if="$dir/memcheck-p$gen" of="$dir/memcheck-region" bs=1M count=1 seek=$b \
                    conv=notrunc 2>/dev/null
            fi
            # Dirty at RATE MiB/s on average: each elapsed centisecond earns RATE/100 MiB.
            now=$(centiseconds)
            budget=$((budget + (now - last) * rate))
            last=$now
            if [ "$rate" -gt 0 ] && [ $budget -ge 100 ]; then
                budget=$((budget - 100))
                [ $budget -gt $((rate * 100)) ] && budget=$((rate * 100))
                next=$(((gen + 1) % 4))
                dd if="$dir/memcheck-p$next" of="$dir/memcheck-region" bs=1M count=1 seek=$b \
                    conv=notrunc 2>/dev/null
                eval "GEN_$b=$next"
            fi
            b=$((b + 1))
        done
        pass=$((pass + 1))
        echo "VMFERRY-MEMCHECK pass=$pass blocks=$mib failures=$failures"
    done
}

centiseconds() {
    read -r up _ < "${VMFERRY_UPTIME:-/proc/uptime}"
    # "12.05" -> 1205; the "1${frac} - 100" keeps a leading 0 from being read as octal.
    echo $(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

if [ "$1" = "--print-config" ]; then
    parse_cmdline "${VMFERRY_CMDLINE:-}"
    echo "name=$NAME ip=$IP gw=$GW workload=$WORKLOAD memcheck=$MEMCHECK"
    exit 0
fi

# The control port's handler (nc -e runs it per connection): one request line on stdin.
talk() {
    read -r proto host port extra mac _ || { echo "VMFERRY-TALK error no request"; return; }
    if [ "$proto" = addr ]; then
        readdress "$host" "$port" "$extra" "$mac"
        return
    fi
    me=$(hostname)
    case "$host" in
        ''|*[!0-9.]*) echo "VMFERRY-TALK error bad host '$host'"; return ;;
    esac
    case "$proto:$port" in
        tcp:*[!0-9]*|udp:*[!0-9]*|tcp:|udp:) echo "VMFERRY-TALK error bad port '$port'"; return ;;
    esac
    # Detached (own session, no stdio of the control connection), so it outlives this call.
    case "$proto" in
        tcp) setsid nc "$host" "$port" -e sh -c "echo VMFERRY-HELLO $me; exec cat" \
                 </dev/null >/dev/null 2>&1 & ;;
        # "-l -": a failed get unlinks its local file, and that must not be /dev/null.
        udp) setsid tftp -g -r "$me" -l - "$host" "$port" </dev/null >/dev/null 2>&1 & ;;
        icmp) setsid ping -i 0.2 "$host" </dev/null >/dev/null 2>&1 & ;;
        *) echo "VMFERRY-TALK error bad protocol '$proto'"; return ;;
    esac
    echo "VMFERRY-TALK started $proto $host $port"
}

# The interface whose MAC is $1 (eth0 for none).
dev_of() {
    [ -z "$1" ] && { echo eth0; return; }
    for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address" 2>/dev/null)" = "$1" ] && { echo "${dev##*/}"; return; }
    done
}

# "addr add|del CIDR [GW|none] [MAC]" of the control port.
readdress() {
    op=$1 cidr=$2 gw=$3
    case "$4" in
        ''|[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) ;;
        *) echo "VMFERRY-TALK error bad MAC '$4'"; return ;;
    esac
    # A NIC hot-plugged a moment ago may still be probing: give it up to 5 s.
    tries=0
    dev=$(dev_of "$4")
    while [ -z "$dev" ] && [ $tries -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
        dev=$(dev_of "$4")
    done
    [ -n "$dev" ] || { echo "VMFERRY-TALK error no NIC with MAC $4"; return; }
    ip link set "$dev" up
    case "$op" in add|del) ;; *) echo "VMFERRY-TALK error bad addr operation '$op'"; return ;; esac
    case "$cidr" in
        */*[!0-9]*|*[!0-9./]*|*/|'') echo "VMFERRY-TALK error bad address '$cidr'"; return ;;
        */*) ;;
        *) echo "VMFERRY-TALK error bad address '$cidr'"; return ;;
    esac
    case "$gw" in
        ''|none|keep) ;;
        *[!0-9.]*) echo "VMFERRY-TALK error bad gateway '$gw'"; return ;;
    esac
    # Safe to repeat: an address already there (add) or gone (del) is left as it is.
    present=no
    ip -4 -o addr show dev "$dev" | grep -q " ${cidr%/*}/" && present=yes
    if [ "$op:$present" = add:no ] || [ "$op:$present" = del:yes ]; then
        ip addr "$op" "$cidr" dev "$dev" || { echo "VMFERRY-TALK error ip addr $op $cidr"; return; }
    fi
    if [ "$gw" = none ]; then
        ip route del default >/dev/null 2>&1
    elif [ -n "$gw" ] && [ "$gw" != keep ]; then
        ip route replace default via "$gw" dev "$dev" || \
            { echo "VMFERRY-TALK error default via $gw"; return; }
    fi
    for kept in $(ip -4 -o addr show dev "$dev" | awk '{print $4}'); do
        setsid arping -q -U -c 2 -I "$dev" "${kept%/*}" </dev/null >/dev/null 2>&1 &
    done
    echo "VMFERRY-TALK started addr $op $cidr ${gw:-}"
}

if [ "$1" = "--talk" ]; then
    talk
    exit 0
fi

if [ "$1" = "--memcheck" ]; then     # on the build host, for tests: --memcheck MIB RATE DIR PASSES
    memcheck "$2" "$3" "$4" "$5"
    exit 0
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run

parse_cmdline "${VMFERRY_CMDLINE:-$(cat /proc/cmdline)}"

while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "VMFERRY-ERROR insmod $module failed"
done < /lib/modules/load-order

hostname "$NAME"
ip link set lo up

# The NIC appears asynchronously after virtio_net loads; give it up to 5 s.
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ $tries -lt 100 ]; do
    sleep 0.05
    tries=$((tries + 1))
done

if [ -z "$IP" ]; then
    echo "VMFERRY-ERROR no vmferry.ip= on the kernel command line"
elif [ ! -e /sys/class/net/eth0 ]; then
    echo "VMFERRY-ERROR no eth0 after loading the virtio modules"
else
    ip link set eth0 up
    ip addr add "$IP" dev eth0
    if [ -n "$GW" ]; then
        ip route add default via "$GW" dev eth0 || echo "VMFERRY-ERROR bad gateway $GW"
    fi
fi

for port in 80 8080; do
    mkdir -p "/www/$port"
    echo "vmferry guest $NAME port $port" > "/www/$port/index.html"
    httpd -p "$port" -h "/www/$port"
done

# nc -ll forks a cat per connection, so a client can hold one echo session open for as
# long as it likes (across a live migration); the loop restarts the listener if it dies.
(
    while true; do
        nc -ll -p 7 -e cat
        sleep 1
    done
) </dev/null >/dev/null 2>&1 &

(
    while true; do
        nc -ll -p 9 -e /init --talk
        sleep 1
    done
) </dev/null >/dev/null 2>&1 &

# Is anything listening on TCP port $1 (4 hex digits), IPv4 or IPv6?
listening() {
    grep -Eq "^ *[0-9]+: [0-9A-F]+:$1 [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 \
        2>/dev/null
}

# READY promises the services answer: the echo listener starts in the background (and a
# busy guest may take a while to get there), so wait for all four ports, up to 10 s.
tries=0
until listening 0007 && listening 0009 && listening 0050 && listening 1F90; do
    if [ $tries -ge 200 ]; then
        echo "VMFERRY-ERROR services not listening on 7, 9, 80 and 8080"
        break
    fi
    sleep 0.05
    tries=$((tries + 1))
done

if [ -n "$IP" ] && [ -e /sys/class/net/eth0 ]; then
    # Tell the L2 where this MAC lives now rather than at the first ARP request.
    arping -q -U -c 1 -I eth0 "${IP%/*}" >/dev/null 2>&1 &
    echo "VMFERRY-READY name=$NAME ip=$IP"
fi

# Dirty WORKLOAD MiB of guest memory per second with random (so non-zero) data: QEMU sends
# zero pages almost for free, so only non-zero data makes a migration work harder.
dirty_memory() {
    mib=$1
    mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    region=$((mem_kib / 1024 / 3))
    [ "$region" -gt 96 ] && region=96
    [ "$region" -lt 16 ] && region=16
    block=8
    dd if=/dev/urandom of=/run/vmferry-block bs=1M count=$block 2>/dev/null
    off=0
    while [ $off -lt $region ]; do
        n=$((region - off))
        [ $n -gt $block ] && n=$block
        dd if=/run/vmferry-block of=/run/vmferry-region bs=1M count=$n seek=$off \
            conv=notrunc 2>/dev/null
        off=$((off + n))
    done
    echo "VMFERRY-WORKLOAD mibps=$mib region_mib=$region"
    off=0
    while true; do
        start=$(centiseconds)
        left=$mib
        while [ $left -gt 0 ]; do
            n=$left
            [ $n -gt $block ] && n=$block
            [ $((off + n)) -gt $region ] && n=$((region - off))
            dd if=/run/vmferry-block of=/run/vmferry-region bs=1M count=$n seek=$off \
                conv=notrunc 2>/dev/null
            off=$(((off + n) % region))
            left=$((left - n))
        done
        spent=$(($(centiseconds) - start))
        if [ $spent -lt 100 ]; then
            sleep "0.$(printf %02d $((100 - spent)))"
        fi
    done
}

if [ "$MEMCHECK" -gt 0 ]; then
    # The region lives in /run (tmpfs: guest RAM). The check dirties at the workload's rate.
    memcheck "$MEMCHECK" "$WORKLOAD" /run
elif [ "$WORKLOAD" -gt 0 ]; then
    dirty_memory "$WORKLOAD"
fi
# PID 1 must never exit; its wait also reaps orphans (the per-connection echo processes).
while true; do
    sleep 3600
done
