/* sandbox-listen.o: the agent's socket, its thread, framing, message parsing,
 * the request log, debug output and the constructor/destructor.
 *
 * One thread blocks in accept() (no CPU when idle) and serves one client at a
 * time. Nothing in here may stop the host program or the serving thread: no
 * exit/abort, every length checked, every failure becomes an error reply or a
 * dropped connection. Frames and errors follow docs/protocol.md.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "patchbox/sandbox.h"
#include "sandbox-internal.h"

#define SANDBOX_TIMEOUT_MS_DEFAULT 5000
#define SANDBOX_PERM_WAIT_MS 1000	/* how long a refused peer may take to send its header */

int sandbox_debug_enabled;

static pthread_mutex_t sandbox_state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sandbox_client_lock = PTHREAD_MUTEX_INITIALIZER;
static int sandbox_started;
static int sandbox_stopping;
static int sandbox_listen_fd = -1;
static int sandbox_client_fd = -1;	/* under sandbox_client_lock, for stop */
static pthread_t sandbox_thread;
static pid_t sandbox_owner_pid;
static int sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
static char sandbox_sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char sandbox_log_path[PATH_MAX];	/* "" = logging off */
static int sandbox_log_fd = -1;
static int sandbox_log_reported;
static int sandbox_start_reported;
static int sandbox_atfork_done;

/* ------------------------------------------------------------------ debug */

void sandbox_debug_printf(const char *fmt, ...)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "patchbox[%d]: ", (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(buf))
		return;
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	size_t len = (size_t)n + ((size_t)m < sizeof(buf) - n - 1 ? (size_t)m : sizeof(buf) - n - 2);
	buf[len++] = '\n';
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

static void sandbox_stderr_print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sandbox_stderr_print(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	size_t len = (size_t)n < sizeof(buf) - 1 ? (size_t)n : sizeof(buf) - 2;
	buf[len++] = '\n';
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

/* ------------------------------------------------------------------ log */

static const char *const sandbox_msg_names[] = {
	[PBX_MSG_INFO] = "INFO", [PBX_MSG_LIST] = "LIST", [PBX_MSG_APPLY] = "APPLY",
	[PBX_MSG_REMOVE] = "REMOVE", [PBX_MSG_TEST] = "TEST", [PBX_MSG_DEBUG] = "DEBUG",
};

static const char *sandbox_msg_name(unsigned type)
{
	if (type < sizeof(sandbox_msg_names) / sizeof(sandbox_msg_names[0]) && sandbox_msg_names[type])
		return sandbox_msg_names[type];
	return NULL;
}

struct sandbox_peer {
	pid_t pid;
	uid_t uid;
};

/* One line per request; failures never affect serving and are reported once. */
static void sandbox_log_write(const struct sandbox_peer *peer, const char *what, const char *patch,
			      const char *result)
{
	if (!sandbox_log_path[0])
		return;
	if (sandbox_log_fd < 0) {
		sandbox_log_fd = open(sandbox_log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0600);
		if (sandbox_log_fd < 0) {
			if (!sandbox_log_reported++)
				sandbox_stderr_print("patchbox: cannot open log %s: %s", sandbox_log_path,
						     strerror(errno));
			return;
		}
	}
	struct timespec ts;
	struct tm tm;
	char when[32] = "?";
	clock_gettime(CLOCK_REALTIME, &ts);
	if (gmtime_r(&ts.tv_sec, &tm))
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	char line[1024];
	int n = snprintf(line, sizeof(line), "%s.%03ldZ pid=%d uid=%u %s%s%s %s\n", when,
			 ts.tv_nsec / 1000000, (int)peer->pid, (unsigned)peer->uid, what,
			 patch ? " name=" : "", patch ? patch : "", result);
	if (n < 0)
		return;
	size_t len = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
	line[len - 1] = '\n';
	ssize_t w = write(sandbox_log_fd, line, len);
	if (w != (ssize_t)len && !sandbox_log_reported++)
		sandbox_stderr_print("patchbox: cannot write log %s: %s", sandbox_log_path,
				     w < 0 ? strerror(errno) : "short write");
}

/* ------------------------------------------------------------------ reader / writer */

/* Bounds-checked little-endian reader over one payload. The first failure is kept
 * (field name, overrun or trailing bytes) and every later read fails too. */
struct sandbox_reader {
	const uint8_t *p;
	size_t len, pos;
	const char *field;
	int failed;
};

static int sandbox_reader_take(struct sandbox_reader *r, const char *field, size_t n, const uint8_t **ret)
{
	if (r->failed)
		return -1;
	if (n > r->len - r->pos) {
		r->failed = 1;
		r->field = field;
		return -1;
	}
	*ret = r->p + r->pos;
	r->pos += n;
	return 0;
}

static int sandbox_reader_uint(struct sandbox_reader *r, const char *field, size_t n, uint64_t *ret)
{
	const uint8_t *b;
	if (sandbox_reader_take(r, field, n, &b) != 0)
		return -1;
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint64_t)b[i] << (8 * i);
	*ret = v;
	return 0;
}

#define SANDBOX_READ_UINT(r, field, n, dst) \
	({ uint64_t v_ = 0; int rc_ = sandbox_reader_uint((r), (field), (n), &v_); (dst) = v_; rc_; })

static int sandbox_reader_str(struct sandbox_reader *r, const char *field, const char **s, uint16_t *len)
{
	uint64_t n;
	const uint8_t *b;
	if (sandbox_reader_uint(r, field, 2, &n) != 0 || sandbox_reader_take(r, field, n, &b) != 0)
		return -1;
	*s = (const char *)b;
	*len = (uint16_t)n;
	return 0;
}

static int sandbox_reader_blob(struct sandbox_reader *r, const char *field, const uint8_t **b, uint32_t *len)
{
	uint64_t n;
	if (sandbox_reader_uint(r, field, 4, &n) != 0 || sandbox_reader_take(r, field, n, b) != 0)
		return -1;
	*len = (uint32_t)n;
	return 0;
}

static int sandbox_reader_end(struct sandbox_reader *r, const char *last)
{
	if (!r->failed && r->pos != r->len) {
		r->failed = 2;
		r->field = last;
	}
	return r->failed ? -1 : 0;
}

static int sandbox_reader_error(const struct sandbox_reader *r, struct sandbox_error *err)
{
	if (r->failed == 2)
		return sandbox_error_set(err, PBX_E_MALFORMED, "%zu trailing bytes after %s",
					 r->len - r->pos, r->field);
	return sandbox_error_set(err, PBX_E_MALFORMED, "field %s runs past the end of the payload (%zu bytes)",
				 r->field ? r->field : "?", r->len);
}

struct sandbox_writer {
	uint8_t *buf;
	size_t len, cap;
	int failed;
};

static void sandbox_writer_put(struct sandbox_writer *w, const void *p, size_t n)
{
	if (w->failed)
		return;
	if (n > w->cap - w->len) {
		size_t cap = w->cap ? w->cap : 256;
		while (cap - w->len < n && cap < ((size_t)PBX_MAX_PAYLOAD + PBX_HEADER_SIZE))
			cap *= 2;
		uint8_t *nb = cap - w->len >= n ? realloc(w->buf, cap) : NULL;
		if (!nb) {
			w->failed = 1;
			return;
		}
		w->buf = nb;
		w->cap = cap;
	}
	memcpy(w->buf + w->len, p, n);
	w->len += n;
}

static void sandbox_writer_uint(struct sandbox_writer *w, uint64_t v, size_t n)
{
	uint8_t b[8];
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)(v >> (8 * i));
	sandbox_writer_put(w, b, n);
}

static void sandbox_writer_str(struct sandbox_writer *w, const char *s)
{
	size_t n = strlen(s);
	if (n > 0xffff)
		n = 0xffff;
	sandbox_writer_uint(w, n, 2);
	sandbox_writer_put(w, s, n);
}

/* ------------------------------------------------------------------ socket I/O */

/* 1 = all n bytes, 0 = orderly EOF before any byte, -1 = error, timeout or EOF inside. */
static int sandbox_recv_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = recv(fd, (uint8_t *)buf + got, n - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			return got == 0 ? 0 : -1;
		got += (size_t)r;
	}
	return 1;
}

static int sandbox_recv_skip(int fd, size_t n)
{
	uint8_t buf[4096];
	while (n > 0) {
		size_t k = n < sizeof(buf) ? n : sizeof(buf);
		if (sandbox_recv_full(fd, buf, k) != 1)
			return -1;
		n -= k;
	}
	return 0;
}

static int sandbox_send_full(int fd, const void *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		/* MSG_NOSIGNAL: a vanished client must not SIGPIPE the host. */
		ssize_t w = send(fd, (const uint8_t *)buf + done, n - done, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		done += (size_t)w;
	}
	return 0;
}

static void sandbox_header_fill(uint8_t *h, unsigned type, uint32_t seq, uint32_t len)
{
	uint32_t magic = PBX_MAGIC;
	uint16_t ver = PBX_VERSION, t = (uint16_t)(type | PBX_REPLY_BIT);
	memcpy(h, &magic, 4);
	memcpy(h + 4, &ver, 2);
	memcpy(h + 6, &t, 2);
	memcpy(h + 8, &seq, 4);
	memcpy(h + 12, &len, 4);
}

/* Error reply built on the stack: works when malloc does not. */
static int sandbox_send_error(int fd, unsigned type, uint32_t seq, const struct sandbox_error *err)
{
	uint8_t buf[PBX_HEADER_SIZE + 4 + 2 + SANDBOX_ERRMSG];
	size_t n = strnlen(err->msg, SANDBOX_ERRMSG - 1);
	int32_t status = err->code;
	uint16_t sl = (uint16_t)n;
	sandbox_header_fill(buf, type, seq, (uint32_t)(4 + 2 + n));
	memcpy(buf + PBX_HEADER_SIZE, &status, 4);
	memcpy(buf + PBX_HEADER_SIZE + 4, &sl, 2);
	memcpy(buf + PBX_HEADER_SIZE + 6, err->msg, n);
	return sandbox_send_full(fd, buf, PBX_HEADER_SIZE + 6 + n);
}

static int sandbox_send_reply(int fd, unsigned type, uint32_t seq, struct sandbox_writer *w)
{
	sandbox_header_fill(w->buf, type, seq, (uint32_t)(w->len - PBX_HEADER_SIZE));
	return sandbox_send_full(fd, w->buf, w->len);
}

/* ------------------------------------------------------------------ messages */

struct sandbox_request {
	struct sandbox_reader r;
	struct sandbox_writer w;	/* header + status 0 already in */
	char patch[PBX_MAX_NAME + 1];	/* for the log */
	char note[SANDBOX_ERRMSG];	/* log result when the status is OK but something failed */
};

static void sandbox_request_name(struct sandbox_request *q, const char *s, size_t n)
{
	size_t k = n < sizeof(q->patch) - 1 ? n : sizeof(q->patch) - 1;
	for (size_t i = 0; i < k; i++)
		q->patch[i] = (s[i] > 0x20 && s[i] < 0x7f) ? s[i] : '?';
	q->patch[k] = '\0';
}

static void sandbox_kv_put(struct sandbox_writer *w, const char *k, const char *v)
{
	sandbox_writer_str(w, k);
	sandbox_writer_str(w, v);
}

static int sandbox_msg_info(struct sandbox_request *q, struct sandbox_error *err)
{
	if (sandbox_reader_end(&q->r, "the (empty) INFO request") != 0)
		return sandbox_reader_error(&q->r, err);
	const struct sandbox_exe_info *exe = sandbox_exe_get();
	struct sandbox_stats st;
	sandbox_stats_get(&st);
	char pid[16], bias[24], bid[2 * PBX_MAX_BUILD_ID + 1] = "unknown";
	char saddr[24], ssize[24], sused[24], sret[24], daddr[24], dsize[24], dused[24], npatch[24];
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	snprintf(bias, sizeof(bias), "0x%lx", (unsigned long)exe->bias);
	for (size_t i = 0; i < exe->build_id_len; i++)
		snprintf(bid + 2 * i, 3, "%02x", exe->build_id[i]);
	snprintf(saddr, sizeof(saddr), "0x%lx", (unsigned long)st.text_addr);
	snprintf(ssize, sizeof(ssize), "%zu", st.text_size);
	snprintf(sused, sizeof(sused), "%zu", st.text_used);
	snprintf(sret, sizeof(sret), "%zu", st.text_retired);
	snprintf(daddr, sizeof(daddr), "0x%lx", (unsigned long)st.data_addr);
	snprintf(dsize, sizeof(dsize), "%zu", st.data_size);
	snprintf(dused, sizeof(dused), "%zu", st.data_used);
	snprintf(npatch, sizeof(npatch), "%zu", st.patches);

	const char *app[4] = { "unknown", "unknown", "unknown", "unknown" };
	const struct patchbox_build_info *bi = &patchbox_build_info;	/* weak: may be NULL */
	if (bi && bi->magic == PATCHBOX_BUILD_INFO_MAGIC && bi->size >= sizeof(*bi)) {
		const char *f[4] = { bi->version, bi->git, bi->date, bi->cflags };
		for (int i = 0; i < 4; i++)
			if (f[i])
				app[i] = f[i];
	}
	const char *kv[][2] = {
		{ "pid", pid }, { "exe", exe->path[0] ? exe->path : "unknown" },
		{ "build_id", bid }, { "load_bias", bias },
		{ "agent_version", SANDBOX_AGENT_VERSION }, { "protocol_version", "1" },
		{ "app_version", app[0] }, { "app_git", app[1] }, { "app_build_date", app[2] },
		{ "app_cflags", app[3] },
		{ "sandbox_addr", saddr }, { "sandbox_size", ssize }, { "sandbox_used", sused },
		{ "sandbox_retired", sret },
		{ "data_addr", daddr }, { "data_size", dsize }, { "data_used", dused },
		{ "patches", npatch },
		{ "debug", __atomic_load_n(&sandbox_debug_enabled, __ATOMIC_RELAXED) ? "1" : "0" },
		{ "log", sandbox_log_path[0] ? sandbox_log_path : "off" },
		{ "socket", sandbox_sock_path }, { "sync_core", st.sync_core },
	};
	size_t n = sizeof(kv) / sizeof(kv[0]);
	sandbox_writer_uint(&q->w, n, 2);
	for (size_t i = 0; i < n; i++)
		sandbox_kv_put(&q->w, kv[i][0], kv[i][1]);
	return 0;
}

static int sandbox_msg_list(struct sandbox_request *q, struct sandbox_error *err)
{
	if (sandbox_reader_end(&q->r, "the (empty) LIST request") != 0)
		return sandbox_reader_error(&q->r, err);
	size_t n = sandbox_patch_count();
	sandbox_writer_uint(&q->w, n, 4);
	for (size_t i = 0; i < n; i++) {
		const struct sandbox_patch *p = sandbox_patch_get(i);
		sandbox_writer_str(&q->w, p->name);
		sandbox_writer_uint(&q->w, p->id, 4);
		sandbox_writer_uint(&q->w, p->applied_at, 8);
		sandbox_writer_uint(&q->w, p->text_addr, 8);
		sandbox_writer_uint(&q->w, p->text_size, 4);
		sandbox_writer_uint(&q->w, p->data_addr, 8);
		sandbox_writer_uint(&q->w, p->data_size, 4);
		sandbox_writer_uint(&q->w, p->nfuncs, 2);
		for (size_t f = 0; f < p->nfuncs; f++) {
			sandbox_writer_str(&q->w, p->funcs[f].symbol);
			sandbox_writer_uint(&q->w, p->funcs[f].target, 8);
			sandbox_writer_uint(&q->w, p->funcs[f].new_entry, 8);
			sandbox_writer_uint(&q->w, p->funcs[f].new_size, 4);
		}
	}
	return 0;
}

/* Parses the apply body (docs/protocol.md APPLY). funcs/fixups are allocated. */
static int sandbox_apply_parse(struct sandbox_request *q, struct sandbox_apply_spec *s, struct sandbox_error *err)
{
	struct sandbox_reader *r = &q->r;
	const uint8_t *b;
	if (sandbox_reader_str(r, "name", &s->name, &s->name_len) != 0)
		return sandbox_reader_error(r, err);
	sandbox_request_name(q, s->name, s->name_len);
	if (SANDBOX_READ_UINT(r, "build_id_len", 1, s->build_id_len) != 0)
		return sandbox_reader_error(r, err);
	if (s->build_id_len < 1 || s->build_id_len > PBX_MAX_BUILD_ID)
		return sandbox_error_set(err, PBX_E_MALFORMED, "build_id_len %u not in 1..%d", s->build_id_len,
					 PBX_MAX_BUILD_ID);
	if (sandbox_reader_take(r, "build_id", s->build_id_len, &s->build_id) != 0 ||
	    SANDBOX_READ_UINT(r, "flags", 4, s->flags) != 0 ||
	    sandbox_reader_blob(r, "text", &s->text, &s->text_len) != 0 ||
	    sandbox_reader_blob(r, "data", &s->data, &s->data_len) != 0 ||
	    SANDBOX_READ_UINT(r, "bss_size", 4, s->bss_size) != 0 ||
	    SANDBOX_READ_UINT(r, "nfuncs", 2, s->nfuncs) != 0)
		return sandbox_reader_error(r, err);
	if (s->nfuncs < 1 || s->nfuncs > PBX_MAX_FUNCS)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfuncs %u not in 1..%d", s->nfuncs, PBX_MAX_FUNCS);
	s->funcs = calloc(s->nfuncs, sizeof(*s->funcs));
	if (!s->funcs)
		return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
	for (size_t i = 0; i < s->nfuncs; i++) {
		struct sandbox_func_spec *f = &s->funcs[i];
		if (sandbox_reader_str(r, "function symbol", &f->symbol, &f->symbol_len) != 0 ||
		    SANDBOX_READ_UINT(r, "function target", 8, f->target) != 0 ||
		    SANDBOX_READ_UINT(r, "function new_offset", 4, f->new_offset) != 0 ||
		    SANDBOX_READ_UINT(r, "function new_size", 4, f->new_size) != 0 ||
		    SANDBOX_READ_UINT(r, "function kind", 1, f->kind) != 0 ||
		    SANDBOX_READ_UINT(r, "function skip", 1, f->skip) != 0 ||
		    SANDBOX_READ_UINT(r, "function expected_len", 2, f->expected_len) != 0 ||
		    sandbox_reader_take(r, "function expected", f->expected_len, &f->expected) != 0)
			return sandbox_reader_error(r, err);
		if (f->symbol_len < 1 || f->symbol_len > PBX_MAX_SYMBOL)
			return sandbox_error_set(err, PBX_E_MALFORMED, "function %zu: symbol length %u not in 1..%d",
						 i, f->symbol_len, PBX_MAX_SYMBOL);
		if (f->expected_len < PBX_MIN_EXPECTED || f->expected_len > PBX_MAX_EXPECTED)
			return sandbox_error_set(err, PBX_E_MALFORMED, "function %zu: expected_len %u not in %d..%d",
						 i, f->expected_len, PBX_MIN_EXPECTED, PBX_MAX_EXPECTED);
		if (f->kind > PBX_KIND_ENTRY_JUMP ||
		    (f->skip != 0 && (f->kind != PBX_KIND_ENTRY_JUMP || f->skip != PBX_ENDBR_SKIP)))
			return sandbox_error_set(err, PBX_E_MALFORMED,
						 "function %zu: kind %u skip %u (kind 0 needs skip 0, kind 1 skip 0 or %d)",
						 i, f->kind, f->skip, PBX_ENDBR_SKIP);
	}
	if (SANDBOX_READ_UINT(r, "nfixups", 4, s->nfixups) != 0)
		return sandbox_reader_error(r, err);
	/* A fix-up is at least 16 bytes: a count the payload cannot hold is refused
	 * before allocating for it. */
	if (s->nfixups > PBX_MAX_FIXUPS || s->nfixups > (r->len - r->pos) / 16)
		return sandbox_error_set(err, PBX_E_MALFORMED, "nfixups %u overruns the payload", s->nfixups);
	s->fixups = calloc(s->nfixups ? s->nfixups : 1, sizeof(*s->fixups));
	if (!s->fixups)
		return sandbox_error_set(err, PBX_E_NO_MEMORY, NULL);
	for (uint32_t i = 0; i < s->nfixups; i++) {
		struct sandbox_fixup_spec *x = &s->fixups[i];
		if (SANDBOX_READ_UINT(r, "fixup section", 1, x->section) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup type", 1, x->type) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup base", 1, x->base) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup reserved", 1, x->reserved) != 0 ||
		    SANDBOX_READ_UINT(r, "fixup offset", 4, x->offset) != 0 ||
		    sandbox_reader_take(r, "fixup addend", 8, &b) != 0)
			return sandbox_reader_error(r, err);
		memcpy(&x->addend, b, 8);
		if (x->base == PBX_BASE_IMPORT &&
		    sandbox_reader_str(r, "fixup symbol", &x->symbol, &x->symbol_len) != 0)
			return sandbox_reader_error(r, err);
	}
	if (sandbox_reader_end(r, "the fix-ups") != 0)
		return sandbox_reader_error(r, err);
	return 0;
}

/* Engine time of APPLY/REMOVE for the reply (benchmarks read it). */
static uint64_t sandbox_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int sandbox_msg_apply(struct sandbox_request *q, struct sandbox_error *err)
{
	struct sandbox_apply_spec spec = { 0 };
	const struct sandbox_patch *p = NULL;
	int rc = sandbox_apply_parse(q, &spec, err);
	uint64_t start = sandbox_now_ns();
	if (rc == 0)
		rc = sandbox_patch_apply(&spec, 0, &p, err);
	if (rc == 0) {
		sandbox_writer_uint(&q->w, p->id, 4);
		sandbox_writer_uint(&q->w, p->text_addr, 8);
		sandbox_writer_uint(&q->w, p->data_addr, 8);
		sandbox_writer_uint(&q->w, sandbox_now_ns() - start, 8);
	}
	free(spec.funcs);
	free(spec.fixups);
	return rc;
}

static int sandbox_msg_remove(struct sandbox_request *q, struct sandbox_error *err)
{
	const char *name;
	uint16_t len;
	if (sandbox_reader_str(&q->r, "name", &name, &len) != 0 || sandbox_reader_end(&q->r, "name") != 0)
		return sandbox_reader_error(&q->r, err);
	sandbox_request_name(q, name, len);
	uint64_t start = sandbox_now_ns();
	int rc = sandbox_patch_remove(name, len, err);
	if (rc == 0)
		sandbox_writer_uint(&q->w, sandbox_now_ns() - start, 8);
	return rc;
}

static int sandbox_msg_test(struct sandbox_request *q, struct sandbox_error *err)
{
	if (sandbox_reader_end(&q->r, "the (empty) TEST request") != 0)
		return sandbox_reader_error(&q->r, err);
	char detail[SANDBOX_ERRMSG];
	int passed = sandbox_selftest_run(detail, sizeof(detail));
	sandbox_writer_uint(&q->w, passed ? 1 : 0, 1);
	sandbox_writer_str(&q->w, detail);
	if (!passed)
		snprintf(q->note, sizeof(q->note), "%s: %s", sandbox_error_text(PBX_E_SELFTEST_FAILED), detail);
	return 0;
}

static int sandbox_msg_debug(struct sandbox_request *q, struct sandbox_error *err)
{
	uint8_t on;
	if (SANDBOX_READ_UINT(&q->r, "on", 1, on) != 0 || sandbox_reader_end(&q->r, "on") != 0)
		return sandbox_reader_error(&q->r, err);
	if (on > 1)
		return sandbox_error_set(err, PBX_E_MALFORMED, "on = %u, expected 0 or 1", on);
	__atomic_store_n(&sandbox_debug_enabled, on, __ATOMIC_RELAXED);
	snprintf(q->note, sizeof(q->note), "ok (debug %s)", on ? "on" : "off");
	return 0;
}

typedef int (*sandbox_handler)(struct sandbox_request *, struct sandbox_error *);
static const sandbox_handler sandbox_handlers[] = {
	[PBX_MSG_INFO] = sandbox_msg_info, [PBX_MSG_LIST] = sandbox_msg_list,
	[PBX_MSG_APPLY] = sandbox_msg_apply, [PBX_MSG_REMOVE] = sandbox_msg_remove,
	[PBX_MSG_TEST] = sandbox_msg_test, [PBX_MSG_DEBUG] = sandbox_msg_debug,
};

/* ------------------------------------------------------------------ serving */

/* Answers one request frame whose payload has been read; returns -1 if the reply
 * could not be sent (connection to drop). */
static int sandbox_request_serve(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
				 const uint8_t *payload, size_t len)
{
	struct sandbox_request q = { .r = { .p = payload, .len = len } };
	struct sandbox_error err = { PBX_E_OK, "" };
	static const uint8_t zero[PBX_HEADER_SIZE + 4];
	sandbox_writer_put(&q.w, zero, sizeof(zero));	/* header + status OK */
	sandbox_debug("%s request seq %u, %zu bytes, from pid %d", sandbox_msg_name(type), seq, len,
		      (int)peer->pid);
	int rc = sandbox_handlers[type](&q, &err);
	if (rc == 0 && q.w.failed)
		rc = sandbox_error_set(&err, PBX_E_NO_MEMORY, "reply too large");
	int sent;
	if (rc != 0) {
		if (err.code == PBX_E_OK)
			sandbox_error_set(&err, PBX_E_INTERNAL, NULL);
		/* Log first: whatever a client has seen is already in the log. */
		char res[SANDBOX_ERRMSG + 8];
		snprintf(res, sizeof(res), "error: %s", err.msg);
		sandbox_log_write(peer, sandbox_msg_name(type), q.patch[0] ? q.patch : NULL, res);
		sandbox_debug("%s: %s", sandbox_msg_name(type), err.msg);
		sent = sandbox_send_error(fd, type, seq, &err);
	} else {
		sandbox_log_write(peer, sandbox_msg_name(type), q.patch[0] ? q.patch : NULL,
				  q.note[0] ? q.note : "ok");
		sent = sandbox_send_reply(fd, type, seq, &q.w);
	}
	free(q.w.buf);
	return sent;
}

/* Answers a frame-level problem; log it too. */
static int sandbox_frame_error(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			       enum pbx_error code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static int sandbox_frame_error(int fd, const struct sandbox_peer *peer, unsigned type, uint32_t seq,
			       enum pbx_error code, const char *fmt, ...)
{
	struct sandbox_error err;
	char detail[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	sandbox_error_set(&err, code, "%s", detail);
	char res[SANDBOX_ERRMSG + 8];
	snprintf(res, sizeof(res), "error: %s", err.msg);
	const char *name = sandbox_msg_name(type);
	char what[32];
	if (!name) {
		snprintf(what, sizeof(what), "FRAME type=0x%x", type & 0xffff);
		name = what;
	}
	sandbox_log_write(peer, name, NULL, res);
	sandbox_debug("frame error: %s", err.msg);
	return sandbox_send_error(fd, type, seq, &err);
}

static void sandbox_client_serve(int fd)
{
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	struct sandbox_peer peer = { -1, (uid_t)-1 };
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0) {
		peer.pid = cred.pid;
		peer.uid = cred.uid;
	}
	if (peer.uid != 0 && peer.uid != geteuid()) {
		/* Echo the first request's type and seq if it arrives quickly. */
		uint8_t h[PBX_HEADER_SIZE];
		unsigned type = 0;
		uint32_t seq = 0, magic;
		struct pollfd pfd = { fd, POLLIN, 0 };
		if (poll(&pfd, 1, SANDBOX_PERM_WAIT_MS) == 1 && recv(fd, h, sizeof(h), MSG_DONTWAIT) == sizeof(h)) {
			memcpy(&magic, h, 4);
			if (magic == PBX_MAGIC) {
				uint16_t t;
				memcpy(&t, h + 6, 2);
				memcpy(&seq, h + 8, 4);
				type = t;
			}
		}
		sandbox_frame_error(fd, &peer, type, seq, PBX_E_PERMISSION, "uid %u (only 0 and %u are served)",
				    (unsigned)peer.uid, (unsigned)geteuid());
		return;
	}
	struct timeval tv = { sandbox_timeout_ms / 1000, (sandbox_timeout_ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	for (;;) {
		uint8_t h[PBX_HEADER_SIZE];
		int rc = sandbox_recv_full(fd, h, sizeof(h));
		if (rc != 1) {
			if (rc < 0)
				sandbox_debug("client pid %d dropped (timeout, error or truncated header)", (int)peer.pid);
			return;
		}
		uint32_t magic, seq, len;
		uint16_t ver, type;
		memcpy(&magic, h, 4);
		memcpy(&ver, h + 4, 2);
		memcpy(&type, h + 6, 2);
		memcpy(&seq, h + 8, 4);
		memcpy(&len, h + 12, 4);
		if (magic != PBX_MAGIC) {
			sandbox_frame_error(fd, &peer, type, seq, PBX_E_BAD_MAGIC, "0x%08x", magic);
			return;	/* the stream cannot be resynchronised */
		}
		if (len > PBX_MAX_PAYLOAD) {
			sandbox_frame_error(fd, &peer, type, seq, PBX_E_TOO_LARGE, "%u bytes, maximum %u", len,
					    (unsigned)PBX_MAX_PAYLOAD);
			return;
		}
		if (ver != PBX_VERSION) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, &peer, type, seq, PBX_E_BAD_VERSION, "version %u, agent speaks %d",
						ver, PBX_VERSION) != 0)
				return;
			continue;
		}
		if (!sandbox_msg_name(type)) {
			if (sandbox_recv_skip(fd, len) != 0)
				return;
			if (sandbox_frame_error(fd, &peer, type, seq, PBX_E_UNKNOWN_MESSAGE, "type %u", type) != 0)
				return;
			continue;
		}
		uint8_t *payload = malloc(len ? len : 1);
		if (!payload) {
			if (sandbox_recv_skip(fd, len) != 0 ||
			    sandbox_frame_error(fd, &peer, type, seq, PBX_E_NO_MEMORY, "payload of %u bytes", len) != 0)
				return;
			continue;
		}
		if (sandbox_recv_full(fd, payload, len) != 1) {
			/* Closed or stalled inside a frame: dropped without effect. */
			sandbox_debug("client pid %d dropped inside a %s frame", (int)peer.pid, sandbox_msg_name(type));
			free(payload);
			return;
		}
		rc = sandbox_request_serve(fd, &peer, type, seq, payload, len);
		free(payload);
		if (rc != 0)
			return;
	}
}

static void *sandbox_listen_thread(void *arg)
{
	(void)arg;
	sigset_t all;
	/* Host signals go to host threads (also blocked around pthread_create). */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_setname_np(pthread_self(), "patchbox-agent");
	int lfd = sandbox_listen_fd;
	while (!__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE)) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (__atomic_load_n(&sandbox_stopping, __ATOMIC_ACQUIRE))
				break;
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EBADF || errno == ENOTSOCK || errno == EINVAL) {
				sandbox_stderr_print("patchbox: agent stopped: accept: %s", strerror(errno));
				break;
			}
			/* EMFILE, ENOMEM...: wait instead of spinning. */
			struct timespec ts = { 0, 100 * 1000 * 1000 };
			nanosleep(&ts, NULL);
			continue;
		}
		pthread_mutex_lock(&sandbox_client_lock);
		sandbox_client_fd = fd;
		pthread_mutex_unlock(&sandbox_client_lock);
		sandbox_client_serve(fd);
		pthread_mutex_lock(&sandbox_client_lock);
		sandbox_client_fd = -1;
		pthread_mutex_unlock(&sandbox_client_lock);
		close(fd);
	}
	return NULL;
}

/* ------------------------------------------------------------------ start / stop */

static int sandbox_start_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sandbox_start_fail(int rc, const char *fmt, ...)
{
	if (!sandbox_start_reported++) {
		char buf[768];
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(buf, sizeof(buf), fmt, ap);
		va_end(ap);
		sandbox_stderr_print("patchbox: agent not started: %s", buf);
	}
	return rc;
}

/* Binds path, replacing a stale socket file (nobody accepting on it). */
static int sandbox_socket_bind(int fd, const struct sockaddr_un *addr)
{
	if (bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) == 0)
		return 0;
	if (errno != EADDRINUSE)
		return -errno;
	int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe < 0)
		return -errno;
	int rc = connect(probe, (const struct sockaddr *)addr, sizeof(*addr));
	int e = errno;
	close(probe);
	if (rc == 0)
		return -EADDRINUSE;	/* a live agent owns it */
	if (e != ECONNREFUSED)
		return -e;
	if (unlink(addr->sun_path) != 0 && errno != ENOENT)
		return -errno;
	if (bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0)
		return -errno;
	return 0;
}

static void sandbox_atfork_child(void)
{
	/* The child has no agent thread: drop the parent's descriptors and state so
	 * the child neither holds the socket open nor unlinks it at exit. */
	if (sandbox_listen_fd >= 0)
		close(sandbox_listen_fd);
	if (sandbox_client_fd >= 0)
		close(sandbox_client_fd);
	if (sandbox_log_fd >= 0)
		close(sandbox_log_fd);
	sandbox_listen_fd = sandbox_client_fd = sandbox_log_fd = -1;
	sandbox_started = 0;
	pthread_mutex_init(&sandbox_state_lock, NULL);
	pthread_mutex_init(&sandbox_client_lock, NULL);
}

static int sandbox_agent_start_locked(void)
{
	const char *env = getenv("PATCHBOX_DISABLE");
	if (env && strcmp(env, "1") == 0)
		return -ECANCELED;
	env = getenv("PATCHBOX_DEBUG");
	if (env && strcmp(env, "1") == 0)
		__atomic_store_n(&sandbox_debug_enabled, 1, __ATOMIC_RELAXED);
	env = getenv("PATCHBOX_CLIENT_TIMEOUT_MS");
	sandbox_timeout_ms = SANDBOX_TIMEOUT_MS_DEFAULT;
	if (env && *env) {
		char *end;
		long v = strtol(env, &end, 10);
		if (*end == '\0' && v > 0 && v <= 3600 * 1000)
			sandbox_timeout_ms = (int)v;
	}

	struct sandbox_error err;
	if (sandbox_engine_init(&err) != 0)
		return sandbox_start_fail(-ENOMEM, "%s", err.msg);

	char dir[PATH_MAX];
	env = getenv("PATCHBOX_SOCK_DIR");
	if (env && *env) {
		if (strlen(env) >= sizeof(dir))
			return sandbox_start_fail(-ENAMETOOLONG, "PATCHBOX_SOCK_DIR too long");
		strcpy(dir, env);
	} else {
		const char *exe = sandbox_exe_get()->path;
		const char *slash = strrchr(exe, '/');
		if (!exe[0] || !slash)
			return sandbox_start_fail(-ENOENT, "cannot read /proc/self/exe");
		size_t n = slash == exe ? 1 : (size_t)(slash - exe);
		memcpy(dir, exe, n);
		dir[n] = '\0';
	}
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int n = snprintf(addr.sun_path, sizeof(addr.sun_path), "%s%ssandbox-sock%d", dir,
			 dir[strlen(dir) - 1] == '/' ? "" : "/", (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(addr.sun_path))
		return sandbox_start_fail(-ENAMETOOLONG, "socket path %s/sandbox-sock%d longer than %zu bytes",
					  dir, (int)getpid(), sizeof(addr.sun_path) - 1);

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return sandbox_start_fail(-errno, "socket: %s", strerror(errno));
	int rc = sandbox_socket_bind(fd, &addr);
	if (rc != 0) {
		close(fd);
		return sandbox_start_fail(rc, "bind %s: %s", addr.sun_path, strerror(-rc));
	}
	/* 0600 before listen(): until then nobody can connect, whatever the umask was. */
	if (chmod(addr.sun_path, 0600) != 0 || listen(fd, 8) != 0) {
		rc = -errno;
		close(fd);
		unlink(addr.sun_path);
		return sandbox_start_fail(rc, "%s: %s", addr.sun_path, strerror(-rc));
	}
	memcpy(sandbox_sock_path, addr.sun_path, sizeof(sandbox_sock_path));

	env = getenv("PATCHBOX_LOG");
	if (env && strcmp(env, "0") == 0)
		sandbox_log_path[0] = '\0';
	else if (env && *env && strlen(env) < sizeof(sandbox_log_path))
		strcpy(sandbox_log_path, env);
	else
		snprintf(sandbox_log_path, sizeof(sandbox_log_path), "%s.log", sandbox_sock_path);
	sandbox_log_reported = 0;
	sandbox_log_fd = -1;

	sandbox_listen_fd = fd;
	__atomic_store_n(&sandbox_stopping, 0, __ATOMIC_RELEASE);
	sigset_t all, old;
	sigfillset(&all);
	/* The thread inherits this mask: no host signal is ever delivered to it. */
	pthread_sigmask(SIG_BLOCK, &all, &old);
	rc = pthread_create(&sandbox_thread, NULL, sandbox_listen_thread, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		close(fd);
		unlink(sandbox_sock_path);
		sandbox_listen_fd = -1;
		sandbox_sock_path[0] = '\0';
		return sandbox_start_fail(-rc, "pthread_create: %s", strerror(rc));
	}
	if (!sandbox_atfork_done++)
		pthread_atfork(NULL, NULL, sandbox_atfork_child);
	sandbox_owner_pid = getpid();
	sandbox_started = 1;
	sandbox_debug("agent listening on %s (log %s)", sandbox_sock_path,
		      sandbox_log_path[0] ? sandbox_log_path : "off");
	return 0;
}

int patchbox_agent_start(void)
{
	pthread_mutex_lock(&sandbox_state_lock);
	int rc = sandbox_started ? 0 : sandbox_agent_start_locked();
	pthread_mutex_unlock(&sandbox_state_lock);
	return rc;
}

void patchbox_agent_stop(void)
{
	pthread_mutex_lock(&sandbox_state_lock);
	if (sandbox_started && sandbox_owner_pid == getpid() && !pthread_equal(pthread_self(), sandbox_thread)) {
		__atomic_store_n(&sandbox_stopping, 1, __ATOMIC_RELEASE);
		/* Wakes accept() (pairs with the stopping check in the thread). */
		shutdown(sandbox_listen_fd, SHUT_RDWR);
		pthread_mutex_lock(&sandbox_client_lock);
		if (sandbox_client_fd >= 0)
			shutdown(sandbox_client_fd, SHUT_RDWR);
		pthread_mutex_unlock(&sandbox_client_lock);
		pthread_join(sandbox_thread, NULL);
		close(sandbox_listen_fd);
		sandbox_listen_fd = -1;
		unlink(sandbox_sock_path);
		sandbox_sock_path[0] = '\0';
		if (sandbox_log_fd >= 0)
			close(sandbox_log_fd);
		sandbox_log_fd = -1;
		sandbox_started = 0;
	}
	pthread_mutex_unlock(&sandbox_state_lock);
}

__attribute__((constructor)) static void sandbox_agent_ctor(void)
{
	patchbox_agent_start();
}

/* At exit the socket file goes; the thread dies with the process. Not in a forked
 * child (sandbox_owner_pid), whose parent still serves on it. */
__attribute__((destructor)) static void sandbox_agent_dtor(void)
{
	if (sandbox_started && sandbox_owner_pid == getpid() && sandbox_sock_path[0])
		unlink(sandbox_sock_path);
}
