#!/bin/sh
# The host's hands inside a driver VM (tools/vm/driver_faults.py): runs each command file the
# host drops into DIR (a 9p rwdir, read uncached), in order and in the background, and leaves
# its output and exit status beside it. Started by the kernel command line at every boot, so
# after a reboot it carries on with the host's next command.
#     guest_agent.sh DIR MAC [SECONDS]
DIR=$1
MAC=$2
LIFE=${3:-1800}  # bounded: the agent stops by itself after this many seconds
IF=
for d in /sys/class/net/*; do
    [ "$(cat "$d/address")" = "$MAC" ] && IF=${d##*/}
done
[ -n "$IF" ] || { echo "no NIC with MAC $MAC" > "$DIR/agent.err"; exit 1; }
export IF
ip link set lo up
ip link set "$IF" up
n=1
while [ -e "$DIR/cmd.$n" ]; do n=$((n + 1)); done  # a reboot: the commands so far are done
echo "$(cat /proc/sys/kernel/random/boot_id) $IF $n" > "$DIR/ready.tmp"
mv "$DIR/ready.tmp" "$DIR/ready"
end=$(($(date +%s) + LIFE))
while [ "$(date +%s)" -lt "$end" ]; do
    if [ -e "$DIR/cmd.$n" ]; then
        (sh "$DIR/cmd.$n" > "$DIR/out.$n" 2>&1; echo $? > "$DIR/rc.$n.tmp"; mv "$DIR/rc.$n.tmp" "$DIR/rc.$n") &
        n=$((n + 1))
    else
        sleep 0.2
    fi
done
