/* sandbox-store.c: the patches installed for this executable's build, applied at start.
 *
 * `patchbox install` stores patch files as STORE/<build-id hex>/<seq>-<name>.pbx
 * (STORE: $PATCHBOX_STORE, else /var/lib/patchbox; docs/host.md "The patch store").
 * sandbox_store_apply runs in the constructor, after the socket is bound and before
 * the agent thread serves (and before main): it applies this build's files in name
 * order, that is install order, and logs each one.
 *
 * The store decides what code runs in every new process, so it is used only when
 * nobody but root or this process's user can write to it: every directory from / to
 * the build's, and every file, owned by root or the effective uid and not writable by
 * group or others (a sticky directory such as /tmp is allowed above the store). The
 * path is walked from / one component at a time, never through a link
 * (sandbox_dir_walk), and the files are opened through the directory's descriptor
 * with O_NOFOLLOW, so nothing checked can be swapped before it is read. A process
 * whose user may not change its code (privileged: setuid, setgid, file capabilities;
 * or not dumpable) reads only the default store, and only root's files in it; its
 * environment is ignored anyway. Anything else is refused and logged; nothing is
 * applied. The file's own hash and signature were checked once, by `patchbox
 * install`; here the header is checked for shape and the apply body goes through the
 * same parser and engine as an APPLY request.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sandbox-server.h"

#define SANDBOX_STORE_DEFAULT "/var/lib/patchbox"
#define SANDBOX_STORE_SEQ 20		/* digits of the install time in a file name */

static void sandbox_store_log(const char *patch, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sandbox_store_log(const char *patch, const char *fmt, ...)
{
	char res[SANDBOX_ERRMSG];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(res, sizeof(res), fmt, ap);
	va_end(ap);
	struct sandbox_peer me = { getpid(), geteuid(), getegid(), -1 };
	sandbox_log_write(&me, "STORE", patch, res);
	sandbox_debug("store: %s%s%s", patch ? patch : "", patch ? ": " : "", res);
}

/* Set at the start of sandbox_store_apply: a privileged or non-dumpable process
 * trusts root's files only (its user may not change its code: docs/security.md). */
static int sandbox_store_root_only;

/* 0 if a store file with status st may be trusted: owned by root (or this process's
 * user, unless root_only), writable by nobody else. */
static int sandbox_store_stat_ok(const struct stat *st)
{
	if (st->st_uid != 0 && (sandbox_store_root_only || st->st_uid != geteuid()))
		return -1;
	return (st->st_mode & (S_IWGRP | S_IWOTH)) ? -1 : 0;
}

static int sandbox_store_name_ok(const char *name)
{
	size_t n = strlen(name);
	if (n < SANDBOX_STORE_SEQ + 6 || strcmp(name + n - 4, ".pbx") != 0 || name[SANDBOX_STORE_SEQ] != '-')
		return 0;
	for (int i = 0; i < SANDBOX_STORE_SEQ; i++)
		if (name[i] < '0' || name[i] > '9')
			return 0;
	return 1;
}

static int sandbox_store_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The apply body of patch-file bytes (header shape checked, meta skipped). The header
 * is struct pbx_file_header and the trailer struct pbx_sig_trailer (wire.h, generated
 * from wire/constants.toml, as format/layout.py's are): no offset is written here. */
static int sandbox_store_body(const uint8_t *buf, size_t size, const uint8_t **body, size_t *len,
			      char *why, size_t cap)
{
	struct pbx_file_header h;
	if (size < sizeof(h) || memcmp(buf, PBX_FILE_MAGIC, sizeof(h.magic)) != 0) {
		snprintf(why, cap, "not a patch file");
		return -1;
	}
	memcpy(&h, buf, sizeof(h));
	size_t trailer = (h.flags & PBX_FILE_FLAG_SIGNED) ? PBX_SIG_TRAILER_SIZE : 0;
	if (h.format != PBX_FILE_FORMAT_VERSION || h.header_size != sizeof(h) || (h.flags & ~PBX_FILE_FLAGS_KNOWN) ||
	    size < sizeof(h) + trailer || h.payload_len != size - sizeof(h) - trailer) {
		snprintf(why, cap, "bad header (version %u, header %u, flags 0x%x, payload %llu of %zu bytes)",
			 (unsigned)h.format, (unsigned)h.header_size, (unsigned)h.flags,
			 (unsigned long long)h.payload_len, size);
		return -1;
	}
	struct sandbox_reader r = { .p = buf + sizeof(h), .len = (size_t)h.payload_len };
	uint64_t count;
	if (sandbox_reader_uint(&r, "meta count", 2, &count) != 0)
		goto bad;
	for (uint64_t i = 0; i < 2 * count; i++) {
		const char *s;
		uint16_t n;
		if (sandbox_reader_str(&r, "meta", &s, &n) != 0)
			goto bad;
	}
	*body = r.p + r.pos;
	*len = r.len - r.pos;
	return 0;
bad:
	snprintf(why, cap, "meta runs past the end of the payload");
	return -1;
}

/* Applies one store file (dfd/name); logs the outcome. */
static void sandbox_store_one(int dfd, const char *name)
{
	char why[SANDBOX_ERRMSG];
	int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		sandbox_store_log(name, "error: cannot open: %s", strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	if (!S_ISREG(st.st_mode) || sandbox_store_stat_ok(&st) != 0 ||
	    st.st_size > (off_t)(PBX_FILE_HEADER_SIZE + PBX_MAX_PAYLOAD + PBX_SIG_TRAILER_SIZE)) {
		sandbox_store_log(name, "error: refused: not a regular file owned by root%s, "
				  "writable by nobody else, of at most the maximum size (mode %04o uid %u, "
				  "%lld bytes)", sandbox_store_root_only ? "" : " or this process's user",
				  (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (long long)st.st_size);
		close(fd);
		return;
	}
	size_t size = (size_t)st.st_size, got = 0;
	uint8_t *buf = malloc(size ? size : 1);
	while (buf && got < size) {
		ssize_t n = read(fd, buf + got, size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	const uint8_t *body;
	size_t len;
	struct sandbox_error err = { PBX_E_OK, "" };
	char patch[PBX_MAX_NAME + 1] = "";
	if (!buf || got != size) {
		sandbox_store_log(name, "error: cannot read (%zu of %zu bytes)", got, size);
	} else if (sandbox_store_body(buf, size, &body, &len, why, sizeof(why)) != 0) {
		sandbox_store_log(name, "error: %s", why);
	} else if (sandbox_body_apply(body, len, patch, sizeof(patch), &err) != 0) {
		sandbox_store_log(patch[0] ? patch : name, "error: %s", err.msg);
	} else {
		sandbox_store_log(patch, "ok (installed patch applied before main: %s)", name);
	}
	free(buf);
}

void sandbox_store_apply(void)
{
	const struct sandbox_object *exe = sandbox_exe_get();
	const char *root = sandbox_getenv("PATCHBOX_STORE");	/* NULL when privileged */
	char dir[PATH_MAX], real[PATH_MAX], why[SANDBOX_ERRMSG];
	sandbox_store_root_only = sandbox_privileged() || prctl(PR_GET_DUMPABLE) != 1;
	if (!root || !*root) {
		root = SANDBOX_STORE_DEFAULT;
	} else if (!realpath(root, real)) {
		return;	/* nothing there: nothing installed */
	} else {
		root = real;	/* walked below without following links: a link swapped in is refused */
	}
	if (exe->build_id_len == 0 || strlen(root) + 2 + 2 * PBX_MAX_BUILD_ID >= sizeof(dir))
		return;
	int n = snprintf(dir, sizeof(dir), "%s/", root);
	for (size_t i = 0; i < exe->build_id_len; i++)
		n += snprintf(dir + n, sizeof(dir) - (size_t)n, "%02x", exe->build_id[i]);
	why[0] = '\0';
	int pfd = sandbox_dir_walk(dir, 0, sandbox_store_root_only, why, sizeof(why));
	if (pfd == -ENOENT)
		return;	/* nothing installed for this build */
	if (pfd < 0) {
		sandbox_store_log(NULL, "refused: %s", why[0] ? why : strerror(-pfd));
		return;
	}
	int dfd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	close(pfd);
	DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	if (!d) {
		if (dfd >= 0)
			close(dfd);
		return;
	}
	char *names[PBX_MAX_PATCHES];
	size_t count = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL && count < PBX_MAX_PATCHES)
		if (sandbox_store_name_ok(de->d_name) && (names[count] = strdup(de->d_name)) != NULL)
			count++;
	qsort(names, count, sizeof(names[0]), sandbox_store_cmp);
	for (size_t i = 0; i < count; i++) {
		sandbox_store_one(dirfd(d), names[i]);
		free(names[i]);
	}
	closedir(d);
}
