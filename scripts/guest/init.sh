#!/bin/busybox sh
# /init of the test guest's initramfs (scripts/guest/image.py puts it there): loads the
# modules listed in /lib/modules/load-order, gives eth0 its address, runs the checked I/O
# loop (/bin/pbguest) and powers off. Its settings come from the kernel command line:
#   pbg.ip=ADDR/PREFIX    eth0's address (no network when absent)
#   pbg.NAME=VALUE        passed to pbguest as --NAME=VALUE (disks, peer, seconds, ...)
# Lines it prints start with INIT, or ERROR for anything that went wrong.
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
uptime() { cut -d' ' -f1 /proc/uptime; }
echo "INIT start t=$(uptime) kernel=$(uname -r)"

loaded=0
for m in $(cat /lib/modules/load-order); do
	if insmod "/lib/modules/$m.ko"; then
		loaded=$((loaded + 1))
	else
		echo "ERROR init insmod $m"
	fi
done
echo "INIT modules loaded=$loaded t=$(uptime)"

ip=
args=
for word in $(cat /proc/cmdline); do
	case "$word" in
	pbg.ip=*) ip=${word#pbg.ip=} ;;
	pbg.*=*) args="$args --${word#pbg.}" ;;
	esac
done

ip link set lo up
if [ -n "$ip" ]; then
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	if ip addr add "$ip" dev eth0 && ip link set eth0 up; then
		echo "INIT net eth0=$ip t=$(uptime)"
	else
		echo "ERROR init network eth0=$ip"
	fi
fi

# shellcheck disable=SC2086 # one word per option
/bin/pbguest $args
echo "INIT exit status=$? t=$(uptime)"
sync
poweroff -f
