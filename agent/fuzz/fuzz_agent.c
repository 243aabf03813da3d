/* libFuzzer harness of the agent: frame handling, message parsing and APPLY
 * validation, through the same code a real client reaches.
 *
 * Each input is the byte stream a client sends on one connection. The harness
 * writes it into one end of a socketpair (then shuts that end for writing) and runs
 * the agent's own per-connection loop, sandbox_client_serve(), on the other end, in
 * this thread. A helper thread reads every reply and checks it follows
 * docs/protocol.md (magic, version, reply bit, length, status, error text).
 *
 * APPLY runs for real, but only against "victims": eight never-called functions of
 * this harness with the 6+2 NOP patchable entry (fuzz_victims below). The harness
 * narrows the agent's idea of the executable text to them, and gives the agent a
 * fixed build-id and load bias so that seeds (agent/fuzz/make_corpus.py) can name
 * them: victim k is at link-time address FUZZ_LINK_BASE + 64*k + 6. After every
 * input the harness checks that each victim is either fully redirected by a patch
 * the agent lists or byte-identical to the original (never half), then removes all
 * patches and resets the sandbox so that inputs do not depend on each other.
 *
 * The harness #includes every agent source, making one translation unit, to reach
 * their static functions and state (the list below follows LIBSANDBOX_PARTS and
 * LISTEN_PARTS in agent/Makefile; a missing one fails the link). Its thread takes
 * the agent thread's place: no agent thread runs (PATCHBOX_DISABLE=1).
 *
 * Built with -DFUZZ_STORE (make -C agent fuzz: fuzz_store), each input is instead the
 * bytes of one file of the patch store (docs/host.md), read as sandbox-store.c reads
 * one at start: the patch-file header and meta (sandbox_store_body), then the apply
 * body through the same parser and engine, against the same victims, with the same
 * invariants after every input. No socket, no thread: thousands of inputs a second.
 *
 * Build: make -C agent fuzz (clang, -fsanitize=fuzzer,address,undefined).
 */
/* The hold wait (PBX_FLAG_HOLD) would cost a second per input: the fuzzer's client
 * thread is never held. One millisecond keeps the path reachable and fast. */
#include "patchbox/wire.h"
#undef PBX_HOLD_WAIT_MS
#define PBX_HOLD_WAIT_MS 1
#include "../src/sandbox-engine.c"
#include "../src/sandbox-objects.c"
#include "../src/sandbox-redirect.c"
#include "../src/sandbox-transition.c"
#include "../src/sandbox-hold.c"
#include "../src/sandbox-shadow.c"
#include "../src/sandbox-listen.c"
#include "../src/sandbox-sock.c"
#include "../src/sandbox-messages.c"
#include "../src/sandbox-wire.c"
#include "../src/sandbox-store.c"
#include "../src/sandbox-trust.c"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define FUZZ_LINK_BASE 0x10000ul
#define FUZZ_VICTIMS 8
#define FUZZ_VICTIM_SIZE 64

/* The fixed build-id the agent believes the executable has (make_corpus.py too). */
static const uint8_t fuzz_build_id[20] = "patchbox-fuzz-bid-01";

/* Victim k: 6 NOPs, entry (2 NOPs), lea eax, [rdi+k]; ret; padded to 64 bytes. */
__asm__(".pushsection .text.fuzz_victims,\"ax\",@progbits\n"
	"\t.p2align 12\n"
	"\t.globl fuzz_victims\n"
	"\t.hidden fuzz_victims\n"
	"fuzz_victims:\n"
	"\t.rept 8\n"
	"\t.byte 0x90,0x90,0x90,0x90,0x90,0x90,0x90,0x90\n"
	"\t.byte 0x8d,0x47,0x01,0xc3\n"
	"\t.fill 52,1,0xcc\n"
	"\t.endr\n"
	"\t.p2align 12,0xcc\n"
	"\t.popsection\n");
extern unsigned char fuzz_victims[] __attribute__((visibility("hidden")));
static uint8_t fuzz_victims_orig[FUZZ_VICTIMS * FUZZ_VICTIM_SIZE];
static int fuzz_verbose;	/* FUZZ_VERBOSE=1: print every reply's status and message */

/* Runs before the agent's constructor (default priority): no socket, no thread. */
__attribute__((constructor(101))) static void fuzz_env(void)
{
	setenv("PATCHBOX_DISABLE", "1", 1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	struct sandbox_error err;
	if (sandbox_engine_init(&err) != 0) {
		fprintf(stderr, "fuzz: sandbox_engine_init: %s\n", err.msg);
		abort();
	}
	/* The executable's text, as far as the agent knows, is the victims only. */
	struct sandbox_object *exe = sandbox_exe_get();
	exe->nx = 1;
	exe->xlo[0] = (uintptr_t)fuzz_victims;
	exe->xhi[0] = (uintptr_t)fuzz_victims + sizeof(fuzz_victims_orig);
	exe->bias = (uintptr_t)fuzz_victims - FUZZ_LINK_BASE;
	memcpy(exe->build_id, fuzz_build_id, sizeof(fuzz_build_id));
	exe->build_id_len = sizeof(fuzz_build_id);
	memcpy(fuzz_victims_orig, fuzz_victims, sizeof(fuzz_victims_orig));
	/* Exercise the log writer without leaving files behind. */
	strcpy(sandbox_log_path, "/dev/null");
	sandbox_timeout_ms = 1000;
	fuzz_verbose = getenv("FUZZ_VERBOSE") != NULL;
	return 0;
}

static void fuzz_fail(const char *what, size_t at)
{
	fprintf(stderr, "fuzz: invariant broken: %s (offset %zu)\n", what, at);
	abort();
}

struct fuzz_io {
	int fd;
	const uint8_t *data;
	size_t size;
};

static uint32_t fuzz_le(const uint8_t *p, size_t n)
{
	uint32_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}

/* Checks one reply payload: status, and for an error the message. */
static void fuzz_check_reply(const uint8_t *p, size_t len, size_t at)
{
	if (len < 4)
		fuzz_fail("reply shorter than its status", at);
	int32_t status = (int32_t)fuzz_le(p, 4);
	if (fuzz_verbose)
		fprintf(stderr, "fuzz: reply status %d %.*s\n", status, status && len > 6 ? (int)(len - 6) : 0,
			(const char *)p + 6);
	if (status < 0 || status >= PBX_E_COUNT_)
		fuzz_fail("unknown status", at);
	if (status == 0)
		return;
	if (len < 6)
		fuzz_fail("error reply without message", at);
	size_t n = fuzz_le(p + 4, 2);
	if (6 + n != len)
		fuzz_fail("error reply length disagrees with its message", at);
	const char *text = sandbox_error_text(status);
	size_t tl = strlen(text);
	if (n < tl || memcmp(p + 6, text, tl) != 0)
		fuzz_fail("error message does not start with its code's text", at);
}

/* The client: sends the input, then reads and checks every reply until EOF. */
static void *fuzz_client(void *arg)
{
	struct fuzz_io *io = arg;
	size_t off = 0;
	while (off < io->size) {
		ssize_t w = send(io->fd, io->data + off, io->size - off, MSG_NOSIGNAL);
		if (w <= 0)
			break;	/* the agent closed the connection (e.g. BAD_MAGIC) */
		off += (size_t)w;
	}
	shutdown(io->fd, SHUT_WR);
	static uint8_t buf[1 << 20];
	size_t have = 0, at = 0;
	for (;;) {
		ssize_t r = recv(io->fd, buf + have, sizeof(buf) - have, 0);
		if (r <= 0)
			break;
		have += (size_t)r;
		while (have >= PBX_HEADER_SIZE) {
			struct pbx_header h;
			memcpy(&h, buf, sizeof(h));
			uint32_t len = h.length;
			if (h.magic != PBX_MAGIC || h.version != PBX_VERSION)
				fuzz_fail("reply header magic/version", at);
			if (!(h.type & PBX_REPLY_BIT))
				fuzz_fail("reply type without the reply bit", at);
			if (len > sizeof(buf) - PBX_HEADER_SIZE)
				fuzz_fail("reply larger than the harness buffer", at);
			if (have < PBX_HEADER_SIZE + len)
				break;
			fuzz_check_reply(buf + PBX_HEADER_SIZE, len, at);
			at += PBX_HEADER_SIZE + len;
			memmove(buf, buf + PBX_HEADER_SIZE + len, have - PBX_HEADER_SIZE - len);
			have -= PBX_HEADER_SIZE + len;
		}
	}
	if (have)
		fuzz_fail("reply truncated", at);
	return NULL;
}

/* Every changed victim byte lies in the bytes an applied function changed, and each
 * applied function's jump is complete (either kind, any target inside the victims). */
static void fuzz_check_victims(void)
{
	const uintptr_t lo = (uintptr_t)fuzz_victims, hi = lo + sizeof(fuzz_victims_orig);
	for (size_t i = 0; i < sizeof(fuzz_victims_orig); i++) {
		if (fuzz_victims[i] == fuzz_victims_orig[i])
			continue;
		int covered = 0;
		for (size_t p = 0; p < sandbox_npatches && !covered; p++)
			for (size_t k = 0; k < sandbox_patches[p]->nfuncs; k++) {
				const struct sandbox_func *g = &sandbox_patches[p]->funcs[k];
				if (lo + i >= g->wlo && lo + i < g->whi)
					covered = 1;
			}
		if (!covered)
			fuzz_fail("victim changed without an applied patch", i);
	}
	for (size_t p = 0; p < sandbox_npatches; p++)
		for (size_t k = 0; k < sandbox_patches[p]->nfuncs; k++) {
			const struct sandbox_func *g = &sandbox_patches[p]->funcs[k];
			if (g->wlo < lo || g->wlo >= hi)
				continue;	/* stacked: its site is in the sandbox */
			const uint8_t *w = (const uint8_t *)g->wlo;
			uint16_t entry;
			memcpy(&entry, (const void *)g->site, sizeof(entry));
			int whole = g->mech == PBX_KIND_ENTRY_JUMP
					    ? w[0] == SANDBOX_INSN_JMP_REL32
					    : w[0] == SANDBOX_INSN_JMP_REL32 && entry == SANDBOX_INSN_JMP_BACK;
			if (!whole)
				fuzz_fail("victim half redirected", g->wlo - lo);
		}
}

/* Removes every patch (top first) and gives the sandbox back, all 0xc3 again. */
static void fuzz_reset(void)
{
	struct sandbox_error err;
	uint8_t state;
	while (sandbox_npatches > 0) {
		const struct sandbox_patch *p = sandbox_patches[sandbox_npatches - 1];
		if (sandbox_patch_remove_mode(p->name, strlen(p->name), 1, &state, &err) != 0) {
			fprintf(stderr, "fuzz: remove %s: %s\n", p->name, err.msg);
			abort();
		}
	}
	/* Nothing ever ran patch code here: retired memory can be refilled at once. */
	struct sandbox_area *t = &sandbox_regions[0].text, *d = &sandbox_regions[0].data;
	for (size_t i = 0; i < t->n; i++)
		if (sandbox_text_refill(t->base + t->ext[i].off, t->ext[i].len) != 0)
			abort();
	t->n = t->used = t->retired = 0;
	d->n = d->used = d->retired = 0;
	if (memcmp(fuzz_victims, fuzz_victims_orig, sizeof(fuzz_victims_orig)) != 0)
		fuzz_fail("victims not restored by remove", 0);
	__atomic_store_n(&sandbox_debug_enabled, 0, __ATOMIC_RELAXED);
}

#ifdef FUZZ_STORE
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *body;
	size_t len;
	char why[SANDBOX_ERRMSG], name[PBX_MAX_NAME + 1];
	struct sandbox_error err = { PBX_E_OK, "" };
	why[0] = '\0';
	if (sandbox_store_body(data, size, &body, &len, why, sizeof(why)) == 0) {
		struct pbx_file_header h;	/* accepted: the file holds at least this */
		memcpy(&h, data, sizeof(h));
		size_t trailer = (h.flags & PBX_FILE_FLAG_SIGNED) ? PBX_SIG_TRAILER_SIZE : 0;
		if (body < data + sizeof(h) || body + len != data + size - trailer)
			fuzz_fail("apply body outside the file's payload", (size_t)(body - data));
		int rc = sandbox_body_apply(body, len, name, sizeof(name), &err);
		if (rc != 0 && (err.code <= PBX_E_OK || err.code >= PBX_E_COUNT_ || !err.msg[0]))
			fuzz_fail("failed apply without an error code and message", 0);
		if (fuzz_verbose)
			fprintf(stderr, "fuzz: store status %d %s\n", rc ? (int)err.code : 0, rc ? err.msg : name);
	} else if (!why[0]) {
		fuzz_fail("refused store file without a reason", 0);
	} else if (fuzz_verbose) {
		fprintf(stderr, "fuzz: store refused %s\n", why);
	}
	fuzz_check_victims();
	fuzz_reset();
	return 0;
}
#else
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
		return 0;
	struct fuzz_io io = { sv[1], data, size };
	pthread_t client;
	if (pthread_create(&client, NULL, fuzz_client, &io) != 0) {
		close(sv[0]);
		close(sv[1]);
		return 0;
	}
	sandbox_client_serve(sv[0]);
	close(sv[0]);	/* the client sees EOF after the last reply */
	pthread_join(client, NULL);
	close(sv[1]);
	fuzz_check_victims();
	fuzz_reset();
	return 0;
}
#endif
