/*
 * pbguest: the checked I/O loop of the test guest (scripts/guest, docs/qemu.md "A real
 * guest"). A static binary in the guest's initramfs, started by /init:
 *
 *   pbguest --disks=vda,sda --peer=10.78.0.1:7777 [--block=16384] [--slots=64]
 *           [--seconds=0] [--progress-ms=100] [--net-timeout-ms=2000] [--disk-wait=30]
 *
 * Each iteration J, for every disk: read slot J mod SLOTS back as written one lap ago
 * (J - SLOTS), write it anew with a block derived from (disk, slot, J), read it back and
 * compare; then send one UDP datagram with a payload derived from J to the host's peer
 * and compare the echo. Disks are opened with O_DIRECT, so every read reaches the device.
 *
 * Prints on stdout (the serial console), one write(2) per line:
 *   READY t=... disks=... peer=... block=... slots=...
 *   PROGRESS seq=N t=... iter=... blk_ok=... net_ok=... errors=... lost=... late=...
 *            gap_ms=... ok.<disk>=...            (every --progress-ms; seq counts lines)
 *   ERROR blk disk=... slot=... seq=... check=... kind=... ...      (every failed check)
 *   ERROR net seq=... kind=lost|corrupt|short|io ...
 *   SUMMARY t=... iters=... blk_ok=... net_ok=... errors=... lost=... late=...
 *           max_gap_ms=... seconds=... reason=...
 * t is CLOCK_MONOTONIC in seconds (the guest's uptime); gap_ms is the longest time between
 * two consecutive completed I/O operations since the previous PROGRESS line. Every ERROR
 * counts in errors; lost packets count in lost too. The loop ends after --seconds (0: never)
 * or when the peer answers with a STOP datagram; exit status 0 when errors=0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_DISKS 4
#define BLK_MAGIC "PBGBLK01"
#define NET_MAGIC "PBGNET01"
#define STOP_MAGIC "PBGSTOP!"
#define NET_MAX 1472 /* one Ethernet frame of UDP over IPv4 */
#define NET_MIN 64

/* The header at the start of every block written; the rest is the derived payload. */
struct blk_hdr {
	char magic[8];
	uint32_t disk;
	uint32_t slot;
	uint64_t seq;
	uint32_t block_size;
	uint32_t payload_crc;
	uint32_t hdr_crc; /* crc32 of the bytes above */
	uint32_t pad;
};

/* The header of every datagram to the peer, which echoes it byte for byte. */
struct net_hdr {
	char magic[8];
	uint64_t seq;
	uint32_t len;
	uint32_t payload_crc;
};

struct disk {
	char name[16];
	char path[32];
	int fd;
	uint64_t ok;
	uint64_t err;
};

static struct disk disks[MAX_DISKS];
static int ndisks;
static size_t block_size = 16384;
static uint32_t slots = 64;
static double seconds;
static unsigned progress_ms = 100;
static unsigned net_timeout_ms = 2000;
static unsigned disk_wait_s = 30;
static char peer_arg[64];

static uint64_t blk_ok, net_ok, errors, lost, late;
static uint64_t last_op_ns, gap_ns, max_gap_ns;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* One write per line: a line is never interleaved with another of ours. */
	(void)!write(STDOUT_FILENO, line, (size_t)n);
}

static double secs(uint64_t ns)
{
	return (double)ns / 1e9;
}

/* An I/O operation completed: the gap since the previous one is what a stall shows as. */
static void op_done(void)
{
	uint64_t t = now_ns();

	if (last_op_ns) {
		uint64_t g = t - last_op_ns;
		if (g > gap_ns)
			gap_ns = g;
		if (g > max_gap_ns)
			max_gap_ns = g;
	}
	last_op_ns = t;
}

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint32_t c = 0xffffffffu;

	while (len--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}

/* splitmix64: the seed of a block's or datagram's pattern from what identifies it. */
static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15u;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
	return x ^ (x >> 31);
}

static void fill(uint8_t *p, size_t len, uint64_t seed)
{
	uint64_t s = mix(seed) | 1;

	for (size_t i = 0; i < len; i += 8) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		memcpy(p + i, &s, len - i < 8 ? len - i : 8);
	}
}

static void make_block(uint8_t *buf, uint32_t disk, uint32_t slot, uint64_t seq)
{
	struct blk_hdr h;

	memset(&h, 0, sizeof(h));
	memcpy(h.magic, BLK_MAGIC, 8);
	h.disk = disk;
	h.slot = slot;
	h.seq = seq;
	h.block_size = (uint32_t)block_size;
	fill(buf + sizeof(h), block_size - sizeof(h), ((uint64_t)disk << 56) ^ ((uint64_t)slot << 40) ^ seq);
	h.payload_crc = crc32(buf + sizeof(h), block_size - sizeof(h));
	h.hdr_crc = crc32(&h, offsetof(struct blk_hdr, hdr_crc));
	memcpy(buf, &h, sizeof(h));
}

/* Returns 0 when BUF is the block (disk, slot, seq) EXPECT holds; else prints the ERROR. */
static int check_block(const struct disk *d, int di, uint32_t slot, uint64_t seq,
		       const char *check, const uint8_t *buf, const uint8_t *expect)
{
	struct blk_hdr h;
	uint32_t crc;
	size_t off;

	if (!memcmp(buf, expect, block_size))
		return 0;
	memcpy(&h, buf, sizeof(h));
	crc = crc32(buf + sizeof(h), block_size - sizeof(h));
	for (off = 0; off < block_size && buf[off] == expect[off]; off++)
		;
	if (memcmp(h.magic, BLK_MAGIC, 8))
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=garbage "
		    "offset=%zu head=%02x%02x%02x%02x%02x%02x%02x%02x",
		    d->name, slot, seq, check, off, buf[0], buf[1], buf[2], buf[3], buf[4], buf[5],
		    buf[6], buf[7]);
	else if (h.hdr_crc != crc32(&h, offsetof(struct blk_hdr, hdr_crc)))
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=header "
		    "offset=%zu",
		    d->name, slot, seq, check, off);
	else if (h.disk != (uint32_t)di || h.slot != slot)
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=misplaced "
		    "found_disk=%" PRIu32 " found_slot=%" PRIu32 " found_seq=%" PRIu64,
		    d->name, slot, seq, check, h.disk, h.slot, h.seq);
	else if (h.seq != seq)
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=stale "
		    "found_seq=%" PRIu64,
		    d->name, slot, seq, check, h.seq);
	else if (crc != h.payload_crc)
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=crc "
		    "offset=%zu expected=%08" PRIx32 " found=%08" PRIx32,
		    d->name, slot, seq, check, off, h.payload_crc, crc);
	else
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=%s kind=data offset=%zu",
		    d->name, slot, seq, check, off);
	return -1;
}

static int full_io(int write_it, int fd, uint8_t *buf, off_t off)
{
	ssize_t n = write_it ? pwrite(fd, buf, block_size, off) : pread(fd, buf, block_size, off);

	if (n == (ssize_t)block_size)
		return 0;
	return n < 0 ? -errno : -EIO;
}

static void disk_error(struct disk *d)
{
	d->err++;
	errors++;
}

/* One disk's part of iteration J: the aged read, the write, the read-back. */
static void disk_step(int di, uint64_t j, uint8_t *io, uint8_t *expect)
{
	struct disk *d = &disks[di];
	uint32_t slot = (uint32_t)(j % slots);
	off_t off = (off_t)slot * (off_t)block_size;
	int rc;

	if (j >= slots) {
		rc = full_io(0, d->fd, io, off);
		op_done();
		make_block(expect, (uint32_t)di, slot, j - slots);
		if (rc) {
			say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=aged kind=io err=%s",
			    d->name, slot, j - slots, strerror(-rc));
			disk_error(d);
		} else if (check_block(d, di, slot, j - slots, "aged", io, expect)) {
			disk_error(d);
		} else {
			d->ok++;
			blk_ok++;
		}
	}
	make_block(expect, (uint32_t)di, slot, j);
	memcpy(io, expect, block_size);
	rc = full_io(1, d->fd, io, off);
	op_done();
	if (rc) {
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=write kind=io err=%s",
		    d->name, slot, j, strerror(-rc));
		disk_error(d);
		return;
	}
	memset(io, 0xa5, block_size);
	rc = full_io(0, d->fd, io, off);
	op_done();
	if (rc) {
		say("ERROR blk disk=%s slot=%" PRIu32 " seq=%" PRIu64 " check=readback kind=io err=%s",
		    d->name, slot, j, strerror(-rc));
		disk_error(d);
	} else if (check_block(d, di, slot, j, "readback", io, expect)) {
		disk_error(d);
	} else {
		d->ok++;
		blk_ok++;
	}
}

static size_t net_len(uint64_t j)
{
	return NET_MIN + (size_t)(mix(j ^ 0x6e6574) % (NET_MAX - NET_MIN + 1));
}

static void make_datagram(uint8_t *p, uint64_t j)
{
	struct net_hdr h;
	size_t len = net_len(j);

	memset(&h, 0, sizeof(h));
	memcpy(h.magic, NET_MAGIC, 8);
	h.seq = j;
	h.len = (uint32_t)len;
	fill(p + sizeof(h), len - sizeof(h), j ^ 0x6e657400000000u);
	h.payload_crc = crc32(p + sizeof(h), len - sizeof(h));
	memcpy(p, &h, sizeof(h));
}

/* One round trip of iteration J; returns 1 when the peer said STOP. */
static int net_step(int sock, uint64_t j)
{
	uint8_t out[NET_MAX], in[NET_MAX + 64];
	size_t len = net_len(j);
	uint64_t deadline;
	struct net_hdr h;

	make_datagram(out, j);
	if (send(sock, out, len, 0) != (ssize_t)len) {
		say("ERROR net seq=%" PRIu64 " kind=io err=%s", j, strerror(errno));
		errors++;
		return 0;
	}
	deadline = now_ns() + (uint64_t)net_timeout_ms * 1000000u;
	for (;;) {
		struct pollfd pfd = { .fd = sock, .events = POLLIN };
		uint64_t t = now_ns();
		ssize_t n;

		if (t >= deadline || poll(&pfd, 1, (int)((deadline - t) / 1000000u) + 1) == 0) {
			say("ERROR net seq=%" PRIu64 " kind=lost len=%zu timeout_ms=%u", j, len,
			    net_timeout_ms);
			errors++;
			lost++;
			return 0;
		}
		n = recv(sock, in, sizeof(in), MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			/* ICMP port unreachable from a peer not listening yet lands here. */
			say("ERROR net seq=%" PRIu64 " kind=io err=%s", j, strerror(errno));
			errors++;
			return 0;
		}
		op_done();
		if (n >= 8 && !memcmp(in, STOP_MAGIC, 8))
			return 1;
		if ((size_t)n < sizeof(h)) {
			say("ERROR net seq=%" PRIu64 " kind=short len=%zd", j, n);
			errors++;
			return 0;
		}
		memcpy(&h, in, sizeof(h));
		if (!memcmp(h.magic, NET_MAGIC, 8) && h.seq < j) {
			late++; /* the echo of a datagram already counted lost */
			continue;
		}
		if ((size_t)n == len && !memcmp(in, out, len)) {
			net_ok++;
			return 0;
		}
		say("ERROR net seq=%" PRIu64 " kind=corrupt len=%zu got_len=%zd got_seq=%" PRIu64
		    " crc=%08" PRIx32 " got_crc=%08" PRIx32,
		    j, len, n, h.seq, crc32(out + sizeof(h), len - sizeof(h)),
		    (size_t)n > sizeof(h) ? crc32(in + sizeof(h), (size_t)n - sizeof(h)) : 0);
		errors++;
		return 0;
	}
}

static void progress(uint64_t seq, uint64_t iter)
{
	char per[128] = "";
	size_t n = 0;

	for (int i = 0; i < ndisks && n < sizeof(per); i++)
		n += (size_t)snprintf(per + n, sizeof(per) - n, " ok.%s=%" PRIu64, disks[i].name,
				      disks[i].ok);
	say("PROGRESS seq=%" PRIu64 " t=%.6f iter=%" PRIu64 " blk_ok=%" PRIu64 " net_ok=%" PRIu64
	    " errors=%" PRIu64 " lost=%" PRIu64 " late=%" PRIu64 " gap_ms=%.3f%s",
	    seq, secs(now_ns()), iter, blk_ok, net_ok, errors, lost, late, (double)gap_ns / 1e6,
	    per);
	gap_ns = 0;
}

static int open_disk(struct disk *d)
{
	uint64_t deadline = now_ns() + (uint64_t)disk_wait_s * 1000000000u;

	snprintf(d->path, sizeof(d->path), "/dev/%.15s", d->name);
	for (;;) {
		d->fd = open(d->path, O_RDWR | O_DIRECT);
		if (d->fd >= 0)
			return 0;
		if (errno != ENOENT && errno != ENXIO)
			break;
		if (now_ns() > deadline)
			break;
		usleep(100000);
	}
	say("ERROR setup disk=%s open %s: %s", d->name, d->path, strerror(errno));
	return -1;
}

static int open_peer(void)
{
	char host[64];
	char *colon;
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int sock;

	snprintf(host, sizeof(host), "%s", peer_arg);
	colon = strrchr(host, ':');
	if (!colon)
		goto bad;
	*colon = 0;
	sa.sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		goto bad;
	sock = socket(AF_INET, SOCK_DGRAM, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		say("ERROR setup peer=%s: %s", peer_arg, strerror(errno));
		return -1;
	}
	return sock;
bad:
	say("ERROR setup peer=%s: not IPV4:PORT", peer_arg);
	return -1;
}

static int parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		char *a = argv[i], *v = strchr(a, '=');

		if (strncmp(a, "--", 2) || !v) {
			say("ERROR setup argument %s: not --NAME=VALUE", a);
			return -1;
		}
		*v++ = 0;
		a += 2;
		if (!strcmp(a, "disks")) {
			for (char *tok = strtok(v, ","); tok; tok = strtok(NULL, ",")) {
				if (ndisks == MAX_DISKS || strlen(tok) >= sizeof(disks[0].name)) {
					say("ERROR setup disks: at most %d short names", MAX_DISKS);
					return -1;
				}
				snprintf(disks[ndisks++].name, sizeof(disks[0].name), "%s", tok);
			}
		} else if (!strcmp(a, "peer")) {
			snprintf(peer_arg, sizeof(peer_arg), "%s", v);
		} else if (!strcmp(a, "block")) {
			block_size = strtoul(v, NULL, 0);
		} else if (!strcmp(a, "slots")) {
			slots = (uint32_t)strtoul(v, NULL, 0);
		} else if (!strcmp(a, "seconds")) {
			seconds = strtod(v, NULL);
		} else if (!strcmp(a, "progress-ms")) {
			progress_ms = (unsigned)strtoul(v, NULL, 0);
		} else if (!strcmp(a, "net-timeout-ms")) {
			net_timeout_ms = (unsigned)strtoul(v, NULL, 0);
		} else if (!strcmp(a, "disk-wait")) {
			disk_wait_s = (unsigned)strtoul(v, NULL, 0);
		} else {
			say("ERROR setup unknown option --%s", a);
			return -1;
		}
	}
	if (block_size < 4096 || block_size % 4096 || block_size > (1u << 20) || !slots) {
		say("ERROR setup block=%zu slots=%" PRIu32 ": block a multiple of 4096 up to 1 MiB",
		    block_size, slots);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	uint8_t *io, *expect;
	uint64_t start, next_progress, j, seq = 0;
	const char *reason = "seconds";
	char names[128] = "";
	int sock = -1;

	crc_init();
	if (parse_args(argc, argv))
		return 2;
	if (posix_memalign((void **)&io, 4096, block_size) ||
	    posix_memalign((void **)&expect, 4096, block_size)) {
		say("ERROR setup out of memory");
		return 2;
	}
	for (int i = 0; i < ndisks; i++) {
		if (open_disk(&disks[i]))
			return 2;
		snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%.15s", i ? "," : "",
			 disks[i].name);
	}
	if (peer_arg[0] && (sock = open_peer()) < 0)
		return 2;
	start = now_ns();
	say("READY t=%.6f disks=%s peer=%s block=%zu slots=%" PRIu32 " progress_ms=%u",
	    secs(start), names[0] ? names : "-", peer_arg[0] ? peer_arg : "-", block_size, slots,
	    progress_ms);
	next_progress = start + (uint64_t)progress_ms * 1000000u;
	for (j = 0;; j++) {
		uint64_t t;

		for (int i = 0; i < ndisks; i++)
			disk_step(i, j, io, expect);
		if (sock >= 0 && net_step(sock, j)) {
			reason = "stop";
			j++;
			break;
		}
		t = now_ns();
		if (t >= next_progress) {
			progress(++seq, j + 1);
			next_progress = t + (uint64_t)progress_ms * 1000000u;
		}
		if (seconds > 0 && secs(t - start) >= seconds) {
			j++;
			break;
		}
	}
	progress(++seq, j);
	{
		char per[160] = "";
		size_t n = 0;

		for (int i = 0; i < ndisks && n < sizeof(per); i++)
			n += (size_t)snprintf(per + n, sizeof(per) - n, " ok.%s=%" PRIu64 " err.%s=%" PRIu64,
					      disks[i].name, disks[i].ok, disks[i].name, disks[i].err);
		say("SUMMARY t=%.6f iters=%" PRIu64 " blk_ok=%" PRIu64 " net_ok=%" PRIu64
		    " errors=%" PRIu64 " lost=%" PRIu64 " late=%" PRIu64 " max_gap_ms=%.3f"
		    " seconds=%.3f reason=%s%s",
		    secs(now_ns()), j, blk_ok, net_ok, errors, lost, late, (double)max_gap_ns / 1e6,
		    secs(now_ns() - start), reason, per);
	}
	return errors ? 1 : 0;
}
