/*
 * Native versions of the per-byte loops of the data path. Each returns exactly what its
 * Python counterpart returns (tests/unit/test_speedups.py compares them on fuzzed input);
 * the sidecar uses the Python code when this module is not built or SIDECAR_PURE_PYTHON is set.
 *
 *   token_starts(data: bytes) -> list[int]
 *       sidecar.redaction._token_starts: where a token prefix may begin.
 *
 *   count_lf(data: bytes) -> int
 *       data.count(b"\n"), as the reader counts the lines of every read, a block at a time.
 *
 *   contains_any(data: bytes, needles: tuple[bytes, ...]) -> bool
 *       any(n in data for n in needles), as redaction asks of every read for the forms of the
 *       environment's secrets: one pass for all of them (see wm_search).
 *
 *   lines_json(data: bytes, partial: bool, base: int, splice: int = 0)  (bytes only)
 *           -> tuple[bytes, int, list[tuple[int, bytes, int]], bytes | None] | None
 *       The records of one segment (sidecar.protocol.texts_of) as JSON strings joined by
 *       commas, as orjson writes them; the record count; and for each record that may be a
 *       JSON object (it begins with "{" and, without trailing CRs, ends with "}"): base + its
 *       index, its text without those CRs, and its kind: 0 when orjson must decide, 1 for a
 *       JSON object that orjson reads too, 2 for one that may also carry an agent event (a
 *       top-level key "usage" or "sidecar_event", or one written with escapes). None when a
 *       record is not valid UTF-8, or a segment of whole lines does not end with LF: the
 *       caller then takes the Python path.
 *       With splice 1 (kind 1) or 2 (kinds 1 and 2), when every such record is of those
 *       kinds, the last item is the records as orjson writes [[index, object], ...] without
 *       the outer brackets (b"" for none), and the list is empty; otherwise it is None and
 *       the list holds them all. splice 0: always None; 3: none wanted (b"", an empty list).
 *
 *   pack_commands(commands: list[tuple | list]) -> bytes | None
 *       The commands in RESP, one after another: what sidecar.resp.pack_py gives for each
 *       (bytes as they are, str as UTF-8, int and float as their str()). None when an argument
 *       is of another type (a bool, None, a subclass), a str cannot be UTF-8 (surrogates), an
 *       int does not fit in 64 bits, or `commands` is not a list of tuples and lists: the
 *       caller then packs in Python.
 *
 *   lone_payload(data: bytes, head: bytes, seq: int, us: int, splice: int, max_records: int,
 *                threshold: int) -> tuple[bytes, int] | None
 *       The batch message of one read of whole lines captured at `us` microseconds, and its
 *       record count: what sidecar.batcher's usual path queues for it (head: the header's
 *       JSON without its closing brace; splice as for lines_json, 1 to 3). None where that
 *       path must take it: a record that is not valid UTF-8, or (splice 1) may carry an
 *       event, more than max_records records, a payload above threshold (>= 0) to compress.
 *
 *   lone_exchange(fd: int, prefix: bytes, first: int, last: int, payload: bytes, suffix: bytes,
 *                 timeout_ms: int) -> tuple[int, int | bytes | None]
 *       Sends prefix (a PING and the start of an append), the append's sequence numbers and
 *       payload as bulk strings, and suffix on the socket fd, then reads the two replies, the
 *       GIL released, each wait at most timeout_ms. (0, None): +PONG and an integer, nothing
 *       more; (1, errno): the connection failed or timed out (ECONNRESET when closed);
 *       (2, bytes): what was read, to be parsed by the caller (an error, another type, more).
 *
 *   set_child_subreaper() -> bool
 *       prctl(PR_SET_CHILD_SUBREAPER, 1) (Linux; False elsewhere or when refused), called before
 *       the agent is spawned: without it agent_wrapper.signals imports ctypes, which costs
 *       every start a millisecond or two before the agent runs.
 *
 * Each only reads `data` and writes into buffers sized before the first write; lone_exchange
 * also writes to and reads from the socket it is given, with the GIL released. token_starts,
 * contains_any and lines_json release the GIL while they scan a segment of 4 KiB or more
 * (bytes only, which no other thread can change meanwhile), so that the reader and the encoder
 * threads can run on two cores at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* SIGPIPE is ignored by Python anyway */
#endif
#ifndef MSG_DONTWAIT
#define MSG_DONTWAIT 0 /* the descriptor of a socket with a timeout is non-blocking anyway */
#endif

/* Eight bytes at a time: a word of plain bytes is handled in one step. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t load8(const unsigned char *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

/* Non-zero when some byte of x equals b. */
static inline uint64_t has_byte(uint64_t x, unsigned char b) {
    uint64_t y = x ^ (ONES * b);
    return (y - ONES) & ~y & HIGHS;
}

/* Non-zero unless all eight bytes are printable ASCII other than " and \ (copied as they are
 * into a JSON string). */
static inline uint64_t needs_care(uint64_t x) {
    uint64_t ctrl = (x - ONES * 0x20) & ~x & HIGHS; /* a byte below 0x20 (when none is >= 0x80) */
    return (x & HIGHS) | ctrl | has_byte(x, '"') | has_byte(x, '\\');
}

/* -- blocks of bytes ----------------------------------------------------------------------- */

/* Both scans look at a block of bytes at a time and stop at the lowest flagged byte. With SSE2
 * (every x86-64) a block is 16 bytes and the flags are exact; elsewhere it is one 8-byte word
 * and only the lowest flag is sure (a borrow may flag bytes above it), which is all that is used. */
#if defined(__SSE2__)
#include <emmintrin.h>
#define BLOCK 16
typedef uint32_t bits_t;
#define LOWEST(bits) ((Py_ssize_t)__builtin_ctz(bits))

/* Bytes equal to a, b, c, d or e, and bytes equal to f that have g six bytes later (p[0..21]
 * are read). */
static inline bits_t any_of5_or_pair(const unsigned char *p, char a, char b, char c, char d, char e, char f, char g) {
    __m128i x = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(a)), _mm_cmpeq_epi8(x, _mm_set1_epi8(b))),
                             _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(c)), _mm_cmpeq_epi8(x, _mm_set1_epi8(d))));
    __m128i y = _mm_loadu_si128((const __m128i *)(p + 6));
    m = _mm_or_si128(m, _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(e)),
                                     _mm_and_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(f)), _mm_cmpeq_epi8(y, _mm_set1_epi8(g)))));
    return (bits_t)_mm_movemask_epi8(m);
}

/* A byte that a JSON string cannot hold as it is: below 0x20 or 0x80 and up (one signed
 * comparison), '"' or '\'. */
static inline bits_t care_bits(const unsigned char *p) {
    __m128i x = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_or_si128(_mm_cmplt_epi8(x, _mm_set1_epi8(0x20)),
                             _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')), _mm_cmpeq_epi8(x, _mm_set1_epi8('\\'))));
    return (bits_t)_mm_movemask_epi8(m);
}
#define CARE_COUNT(bits) ((Py_ssize_t)__builtin_popcount(bits))
#else
#define BLOCK 8
typedef uint64_t bits_t;
#define LOWEST(bits) ((Py_ssize_t)(__builtin_ctzll(bits) >> 3))

/* As above; a flag above the lowest may be false, as with has_byte, and none is missed. */
static inline bits_t any_of5_or_pair(const unsigned char *p, char a, char b, char c, char d, char e, char f, char g) {
    uint64_t x = load8(p);
    return has_byte(x, (unsigned char)a) | has_byte(x, (unsigned char)b) | has_byte(x, (unsigned char)c)
           | has_byte(x, (unsigned char)d) | has_byte(x, (unsigned char)e)
           | (has_byte(x, (unsigned char)f) & has_byte(load8(p + 6), (unsigned char)g));
}

static inline bits_t care_bits(const unsigned char *p) { return needs_care(load8(p)); }
#define CARE_COUNT(bits) ((Py_ssize_t)__builtin_popcountll(bits)) /* may count more: a bound */
#endif

/* A growing array of Py_ssize_t, filled without the GIL. */
typedef struct {
    Py_ssize_t *v;
    Py_ssize_t len, cap;
} Array;

static int array_push(Array *a, Py_ssize_t x) {
    if (a->len == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 16;
        Py_ssize_t *v = PyMem_RawRealloc(a->v, (size_t)cap * sizeof *v);
        if (v == NULL)
            return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = x;
    return 0;
}

/* Segments at least this long are scanned with the GIL released, so that the reader and the
 * encoder run on two cores; below it, releasing costs more than it lets run. */
#define NOGIL_BYTES 4096

/* Releases the GIL for a scan of n bytes when it is worth it; returns what gil_back() takes. */
static inline PyThreadState *gil_release(Py_ssize_t n) {
    return n >= NOGIL_BYTES ? PyEval_SaveThread() : NULL;
}

static inline void gil_back(PyThreadState *released) {
    if (released != NULL)
        PyEval_RestoreThread(released);
}

/* -- token_starts ------------------------------------------------------------------------ */

/* In sidecar.redaction, the folding table maps o u s r a b to p: a folded "p" stands for any
 * of these. */
static int folds_to_p(unsigned char c) {
    return c == 'p' || c == 'o' || c == 'u' || c == 's' || c == 'r' || c == 'a' || c == 'b';
}

/* Every prefix is found by one of - _ A J B, which are rare in text (s, g and x, the bytes
 * most prefixes begin with, are not), or by a b with a space six bytes on. Most are found by
 * their last byte, looking back: sk-, glpat- and x?x?- end with -, gh?_, github_pat_,
 * [rs]k_live_, [rs]k_test_, hf_ and npm_ with _, A?IA with A, eyJ (a JWT) with J. Four are
 * found by their first byte, looking ahead: AIza (a Google API key), "-----BEGIN " (a private
 * key's first line, which begins a block, not a token), "Bearer " (in any case: a B, or a b
 * with a space six bytes on) and "uthorization: Basic ", whose token begins after the space
 * (that is the start given). Of the bytes inside a prefix that are such bytes, none ends
 * another prefix looking back (the _ of "github_", of "sk_"), and no prefix found looking back
 * begins before one found ahead at an earlier byte, so the starts come out in order; the same
 * start can come twice in a row ("Bearer sk-..."), and is kept once. */
static Py_ssize_t prefix_ending_at(const unsigned char *s, Py_ssize_t i) {
    switch (s[i]) {
    case '-':
        if (i >= 2 && s[i - 2] == 's' && s[i - 1] == 'k')
            return i - 2;
        if (i >= 4 && s[i - 4] == 'x' && folds_to_p(s[i - 3]) && s[i - 2] == 'x' && folds_to_p(s[i - 1]))
            return i - 4;
        if (i >= 5 && memcmp(s + i - 5, "glpat", 5) == 0)
            return i - 5;
        return -1;
    case '_':
        if (i >= 3 && s[i - 3] == 'g' && s[i - 2] == 'h' && folds_to_p(s[i - 1]))
            return i - 3;
        if (i >= 10 && memcmp(s + i - 10, "github_pat", 10) == 0)
            return i - 10;
        if (i >= 2 && s[i - 2] == 'h' && s[i - 1] == 'f')
            return i - 2;
        if (i >= 3 && memcmp(s + i - 3, "npm", 3) == 0)
            return i - 3;
        if (i >= 7 && (s[i - 7] == 's' || s[i - 7] == 'r') && s[i - 6] == 'k' && s[i - 5] == '_'
            && (memcmp(s + i - 4, "live", 4) == 0 || memcmp(s + i - 4, "test", 4) == 0))
            return i - 7;
        return -1;
    case 'A':
        if (i >= 3 && s[i - 3] == 'A' && (s[i - 2] == 'K' || s[i - 2] == 'S') && s[i - 1] == 'I')
            return i - 3;
        return -1;
    case 'J':
        if (i >= 2 && s[i - 2] == 'e' && s[i - 1] == 'y')
            return i - 2;
        return -1;
    default:
        return -1;
    }
}

static Py_ssize_t prefix_starting_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    if (s[i] == 'A' && i + 4 <= n && memcmp(s + i + 1, "Iza", 3) == 0)
        return i;
    if ((s[i] | 0x20) == 'b' && i + 7 <= n && (s[i + 1] | 0x20) == 'e' && (s[i + 2] | 0x20) == 'a'
        && (s[i + 3] | 0x20) == 'r' && (s[i + 4] | 0x20) == 'e' && (s[i + 5] | 0x20) == 'r' && s[i + 6] == ' ')
        return i + 7;
    if (s[i] == 'B' && i >= 14 && i + 6 <= n && memcmp(s + i + 1, "asic ", 5) == 0
        && memcmp(s + i - 14, "uthorization: ", 14) == 0)
        return i + 6;
    if (s[i] == '-' && i + 11 <= n && memcmp(s + i + 1, "----BEGIN ", 10) == 0)
        return i;
    return -1;
}

static int push_start(Array *out, Py_ssize_t start) {
    if (start < 0 || (out->len > 0 && out->v[out->len - 1] == start))
        return 0;
    return array_push(out, start);
}

static int scan_token_starts(const unsigned char *s, Py_ssize_t n, Array *out) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + BLOCK + 6 <= n) {
            bits_t hits = any_of5_or_pair(s + i, '-', '_', 'A', 'J', 'B', 'b', ' ');
            if (hits == 0) {
                i += BLOCK;
                continue;
            }
            i += LOWEST(hits);
        }
        if (push_start(out, prefix_ending_at(s, i)) < 0 || push_start(out, prefix_starting_at(s, n, i)) < 0)
            return -1;
        i++;
    }
    return 0;
}

static PyObject *token_starts(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Array found = {NULL, 0, 0};
    /* only bytes may be read without the GIL: another thread could change a bytearray */
    PyThreadState *released = gil_release(PyBytes_CheckExact(arg) ? view.len : 0);
    int rc = scan_token_starts(view.buf, view.len, &found);
    gil_back(released);
    PyBuffer_Release(&view);
    PyObject *out = rc < 0 ? PyErr_NoMemory() : PyList_New(found.len);
    for (Py_ssize_t k = 0; out != NULL && k < found.len; k++) {
        PyObject *pos = PyLong_FromSsize_t(found.v[k]);
        if (pos == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, k, pos);
    }
    PyMem_RawFree(found.v);
    return out;
}

/* -- count_lf ---------------------------------------------------------------------------- */

static Py_ssize_t count_byte(const unsigned char *s, Py_ssize_t n, unsigned char b) {
    Py_ssize_t count = 0, i = 0;
#if defined(__SSE2__)
    /* per-byte-lane counters (a match is -1, subtracted), summed before any lane can wrap */
    const __m128i want = _mm_set1_epi8((char)b), zero = _mm_setzero_si128();
    while (i + 16 <= n) {
        __m128i lanes = zero;
        for (int k = 0; k < 255 && i + 16 <= n; k++, i += 16)
            lanes = _mm_sub_epi8(lanes, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i)), want));
        __m128i sums = _mm_sad_epu8(lanes, zero);
        count += _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_unpackhi_epi64(sums, sums));
    }
#endif
    for (; i < n; i++)
        count += s[i] == b;
    return count;
}

static PyObject *count_lf(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "count_lf: bytes expected");
        return NULL;
    }
    return PyLong_FromSsize_t(count_byte((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg), '\n'));
}

/* -- contains_any ------------------------------------------------------------------------ */

/* One pass for all needles (Wu-Manber): with m the shortest needle's length, the window of m
 * bytes ending at each position is judged by its last two bytes. A table says how far the
 * window may move before those two bytes could be the end of some needle's first m bytes;
 * only where it may not move are the needles compared there. Typical text moves m - 1 bytes
 * a step. The table is indexed by a 12-bit hash of the two bytes (a collision only moves
 * less far), and rebuilt each call: 4 KiB, less than the scan of a read. */
#define WM_BITS 12
#define WM_HASH(a, b) ((((unsigned)(a) << 5) ^ (unsigned)(b) ^ ((unsigned)(a) >> 3)) & ((1u << WM_BITS) - 1))

typedef struct {
    const unsigned char *p;
    Py_ssize_t len;
} Needle;

static int wm_search(const unsigned char *s, Py_ssize_t n, const Needle *nd, Py_ssize_t k, Py_ssize_t m) {
    unsigned char shift[1u << WM_BITS];
    unsigned char most = (unsigned char)(m - 1 < 255 ? m - 1 : 255);
    memset(shift, most, sizeof shift);
    for (Py_ssize_t j = 0; j < k; j++)
        for (Py_ssize_t q = 0; q + 1 < m; q++) { /* the pair at q, q+1 of needle j's first m bytes */
            Py_ssize_t d = m - 2 - q; /* how far it is from the window's end */
            unsigned h = WM_HASH(nd[j].p[q], nd[j].p[q + 1]);
            if (d < shift[h])
                shift[h] = (unsigned char)d;
        }
    for (Py_ssize_t i = 0; i + m <= n;) { /* the window s[i : i+m] */
        unsigned char d = shift[WM_HASH(s[i + m - 2], s[i + m - 1])];
        if (d) {
            i += d;
            continue;
        }
        for (Py_ssize_t j = 0; j < k; j++)
            if (nd[j].len <= n - i && memcmp(s + i, nd[j].p, (size_t)nd[j].len) == 0)
                return 1;
        i++;
    }
    return 0;
}

/* contains_any(data: bytes, needles: tuple[bytes, ...]) -> bool: any(n in data for n in needles).
 * One needle: glibc's memmem. Several: wm_search, unless the shortest has fewer than 4 bytes
 * (then the table would rarely let the window move): memmem for each. */
static PyObject *contains_any(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data, *needles;
    if (!PyArg_ParseTuple(args, "SO!", &data, &PyTuple_Type, &needles))
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t k = PyTuple_GET_SIZE(needles);
    Needle small[32];
    Needle *nd = k <= 32 ? small : PyMem_Malloc((size_t)k * sizeof *nd);
    if (nd == NULL)
        return PyErr_NoMemory();
    Py_ssize_t m = PY_SSIZE_T_MAX;
    int found = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, j);
        if (!PyBytes_Check(needle)) {
            if (nd != small)
                PyMem_Free(nd);
            PyErr_SetString(PyExc_TypeError, "contains_any: needles must be bytes");
            return NULL;
        }
        nd[j].p = (const unsigned char *)PyBytes_AS_STRING(needle);
        nd[j].len = PyBytes_GET_SIZE(needle);
        if (nd[j].len == 0)
            found = 1; /* as `b"" in data` */
        if (nd[j].len < m)
            m = nd[j].len;
    }
    if (!found && k > 0) {
        /* the tuple holds the needles and the caller's arguments hold both: all stay put */
        PyThreadState *released = gil_release(n);
        if (k > 1 && m >= 4) {
            found = wm_search(s, n, nd, k, m);
        } else {
            for (Py_ssize_t j = 0; j < k && !found; j++)
                found = nd[j].len <= n && memmem(s, (size_t)n, nd[j].p, (size_t)nd[j].len) != NULL;
        }
        gil_back(released);
    }
    if (nd != small)
        PyMem_Free(nd);
    return PyBool_FromLong(found);
}

/* -- lines_json -------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (at most `left` bytes), or 0 if it is not one.
 * Strict, as Python's "utf-8" codec: no overlong forms, no surrogates, nothing past U+10FFFF. */
static Py_ssize_t utf8_len(const unsigned char *s, Py_ssize_t left) {
    unsigned char c = s[0], lo = 0x80, hi = 0xBF; /* the range of the second byte */
    Py_ssize_t len;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80; /* E0: no overlong form */
        hi = c == 0xED ? 0x9F : 0xBF; /* ED: no surrogate */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        lo = c == 0xF0 ? 0x90 : 0x80; /* F0: no overlong form */
        hi = c == 0xF4 ? 0x8F : 0xBF; /* F4: nothing past U+10FFFF */
    } else {
        return 0;
    }
    if (left < len || s[1] < lo || s[1] > hi)
        return 0;
    for (Py_ssize_t k = 2; k < len; k++)
        if ((s[k] & 0xC0) != 0x80)
            return 0;
    return len;
}

/* -- JSON objects -------------------------------------------------------------------------- */

/* Whether a record is one JSON object (RFC 8259) that orjson reads as well. Conservative: 0
 * also for what orjson might still take (a number with an exponent or more than 40 characters,
 * a \u escape of a surrogate, nesting past JSON_MAX_DEPTH): the caller then asks orjson. The
 * text is valid UTF-8 already. */
#define JSON_MAX_DEPTH 190 /* below sidecar.protocol.MAX_JSON_DEPTH */

typedef struct {
    const unsigned char *p, *end;
    int depth;
    int event_key; /* a top-level key reads "usage" or "sidecar_event", or has an escape */
} Json;

/* Only an object with one of these top-level keys carries an agent event (sidecar.events). */
static int event_key(const unsigned char *key, Py_ssize_t len) {
    return (len == 5 && memcmp(key, "usage", 5) == 0) || (len == 13 && memcmp(key, "sidecar_event", 13) == 0)
        || memchr(key, '\\', (size_t)len) != NULL;
}

static int j_value(Json *j);

static void j_ws(Json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex_digit(unsigned char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int j_string(Json *j) { /* at the opening quote */
    j->p++;
    while (j->p < j->end) {
        unsigned char c = *j->p++;
        if (c == '"')
            return 1;
        if (c < 0x20)
            return 0;
        if (c != '\\')
            continue;
        if (j->p >= j->end)
            return 0;
        c = *j->p++;
        if (c == 'u') {
            if (j->end - j->p < 4)
                return 0;
            int v = 0;
            for (int k = 0; k < 4; k++) {
                int h = hex_digit(j->p[k]);
                if (h < 0)
                    return 0;
                v = v * 16 + h;
            }
            if (v >= 0xD800 && v <= 0xDFFF)
                return 0; /* surrogate pairs and lone halves: orjson decides */
            j->p += 4;
        } else if (c != '"' && c != '\\' && c != '/' && c != 'b' && c != 'f' && c != 'n' && c != 'r' && c != 't') {
            return 0;
        }
    }
    return 0;
}

static int j_digits(Json *j) {
    const unsigned char *start = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > start;
}

static int j_number(Json *j) {
    const unsigned char *start = j->p;
    if (*j->p == '-')
        j->p++;
    if (j->p >= j->end)
        return 0;
    if (*j->p == '0')
        j->p++;
    else if (!j_digits(j))
        return 0;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!j_digits(j))
            return 0;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E'))
        return 0; /* its range is orjson's to judge */
    return j->p - start <= 40;
}

static int j_literal(Json *j, const char *word, Py_ssize_t len) {
    if (j->end - j->p < len || memcmp(j->p, word, (size_t)len) != 0)
        return 0;
    j->p += len;
    return 1;
}

static int j_container(Json *j, unsigned char close) { /* at [ or { */
    if (++j->depth > JSON_MAX_DEPTH)
        return 0;
    j->p++;
    j_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        j->depth--;
        return 1;
    }
    for (;;) {
        if (close == '}') {
            const unsigned char *key = j->p;
            if (j->p >= j->end || *j->p != '"' || !j_string(j))
                return 0;
            if (j->depth == 1 && event_key(key + 1, j->p - key - 2))
                j->event_key = 1;
            j_ws(j);
            if (j->p >= j->end || *j->p != ':')
                return 0;
            j->p++;
            j_ws(j);
        }
        if (!j_value(j))
            return 0;
        j_ws(j);
        if (j->p >= j->end)
            return 0;
        if (*j->p == ',') {
            j->p++;
            j_ws(j);
            continue;
        }
        if (*j->p != close)
            return 0;
        j->p++;
        j->depth--;
        return 1;
    }
}

static int j_value(Json *j) {
    if (j->p >= j->end)
        return 0;
    switch (*j->p) {
    case '{': return j_container(j, '}');
    case '[': return j_container(j, ']');
    case '"': return j_string(j);
    case 't': return j_literal(j, "true", 4);
    case 'f': return j_literal(j, "false", 5);
    case 'n': return j_literal(j, "null", 4);
    default:
        if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))
            return j_number(j);
        return 0;
    }
}

/* Text that begins with "{" and ends with "}": 0 when orjson must decide, 1 for a JSON object
 * without an event key, 2 for one with (see event_key). */
static int json_object_kind(const unsigned char *s, Py_ssize_t n) {
    Json j = {s, s + n, 0, 0};
    if (!j_container(&j, '}') || j.p != j.end)
        return 0;
    return j.event_key ? 2 : 1;
}

/* For each byte: 1 if a JSON string cannot hold it as it is (below 0x20, '"', '\', or the
 * first byte of a multi-byte UTF-8 sequence, checked separately). */
static unsigned char CARE[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++)
        CARE[c] = c < 0x20 || c == '"' || c == '\\' || c >= 0x80;
}

static inline Py_ssize_t next_care(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) {
    for (; i + BLOCK <= n; i += BLOCK) {
        bits_t bits = care_bits(s + i);
        if (bits)
            return i + LOWEST(bits);
    }
    while (i < n && !CARE[s[i]])
        i++;
    return i;
}

/* At most how many bytes the JSON of n bytes takes: 6 for a byte that needs care (the longest
 * escape, \u00XX, or the 3 of '","' between records), 1 for any other, and the 2 quotes. */
static Py_ssize_t json_bound(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t care = 0, i = 0;
    for (; i + BLOCK <= n; i += BLOCK)
        care += CARE_COUNT(care_bits(s + i));
    for (; i < n; i++)
        care += CARE[s[i]];
    return n + 5 * care + 2;
}

static const char HEX[] = "0123456789abcdef";

static inline char *escaped(char *w, unsigned char c) {
    *w++ = '\\';
    switch (c) {
    case '"': *w++ = '"'; break;
    case '\\': *w++ = '\\'; break;
    case '\b': *w++ = 'b'; break;
    case '\t': *w++ = 't'; break;
    case '\n': *w++ = 'n'; break;
    case '\f': *w++ = 'f'; break;
    case '\r': *w++ = 'r'; break;
    default:
        *w++ = 'u'; *w++ = '0'; *w++ = '0';
        *w++ = HEX[c >> 4]; *w++ = HEX[c & 0xF];
    }
    return w;
}

/* A record that may be a JSON object, kept as three numbers: index, start, end. */
static int record_done(const unsigned char *s, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t index,
                       Array *cands, Array *kinds) {
    Py_ssize_t last = stop; /* without the trailing CRs */
    while (last > start && s[last - 1] == '\r')
        last--;
    if (last - start < 2 || s[start] != '{' || s[last - 1] != '}')
        return 0;
    if (array_push(cands, index) < 0 || array_push(cands, start) < 0 || array_push(cands, last) < 0)
        return -1;
    return array_push(kinds, json_object_kind(s + start, last - start));
}

/* The records of s as JSON strings joined by commas, into w (room for json_bound(s, n)).
 * Returns the bytes written, -1 for a record that is not valid UTF-8, -2 out of memory. */
static Py_ssize_t write_lines(const unsigned char *s, Py_ssize_t n, int partial, Py_ssize_t base, char *out,
                              Py_ssize_t *records, Array *cands, Array *kinds) {
    char *w = out;
    Py_ssize_t i = 0, start = 0, count = 0;
    *w++ = '"';
    for (;;) {
        Py_ssize_t c = next_care(s, i, n);
        memcpy(w, s + i, (size_t)(c - i));
        w += c - i;
        if (c >= n)
            break; /* partial: the one record ends here; whole lines end at their last LF */
        unsigned char ch = s[c];
        if (ch == '\n' && !partial) {
            if (record_done(s, start, c, base + count, cands, kinds) < 0)
                return -2;
            count++;
            if (c == n - 1)
                break;
            memcpy(w, "\",\"", 3);
            w += 3;
            start = i = c + 1;
        } else if (ch >= 0x80) {
            Py_ssize_t k = utf8_len(s + c, n - c); /* an LF is no continuation byte */
            if (k == 0)
                return -1;
            memcpy(w, s + c, (size_t)k);
            w += k;
            i = c + k;
        } else {
            w = escaped(w, ch);
            i = c + 1;
        }
    }
    if (partial) {
        if (record_done(s, 0, n, base, cands, kinds) < 0)
            return -2;
        count = 1;
    }
    *w++ = '"';
    *records = count;
    return w - out;
}

/* Where a decimal Py_ssize_t (>= 0) is written, its digits; returns the end. */
static char *decimal(char *w, Py_ssize_t v) {
    char digits[24];
    int k = 0;
    do {
        digits[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (k)
        *w++ = digits[--k];
    return w;
}

/* The candidates as orjson writes [[index, text], ...] with each text spliced in, without the
 * outer brackets; NULL with an exception set. */
static Py_ssize_t objects_bound(const Array *cands) {
    Py_ssize_t size = 0;
    for (Py_ssize_t k = 0; k < cands->len / 3; k++)
        size += cands->v[3 * k + 2] - cands->v[3 * k + 1] + 24; /* "[", 20 digits at most, ",", "]", "," */
    return size;
}

/* The candidates' [index,object] pairs, comma-joined, at w (room for objects_bound); the end. */
static char *write_objects(char *w, const unsigned char *s, const Array *cands) {
    for (Py_ssize_t k = 0; k < cands->len / 3; k++) {
        const Py_ssize_t *c = cands->v + 3 * k;
        if (k)
            *w++ = ',';
        *w++ = '[';
        w = decimal(w, c[0]);
        *w++ = ',';
        memcpy(w, s + c[1], (size_t)(c[2] - c[1]));
        w += c[2] - c[1];
        *w++ = ']';
    }
    return w;
}

static PyObject *spliced_objects(const unsigned char *s, const Array *cands) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, objects_bound(cands));
    if (out == NULL)
        return NULL;
    char *w = write_objects(PyBytes_AS_STRING(out), s, cands);
    if (_PyBytes_Resize(&out, w - PyBytes_AS_STRING(out)) < 0)
        return NULL;
    return out;
}

static PyObject *lines_json(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data;
    int partial, splice = 0;
    Py_ssize_t base;
    /* bytes only: they are read with the GIL released, and cannot change meanwhile */
    if (!PyArg_ParseTuple(args, "Spn|i", &data, &partial, &base, &splice))
        return NULL;
    if (base < 0 || base > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "lines_json: base out of range");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (!partial && (n == 0 || s[n - 1] != '\n'))
        Py_RETURN_NONE;
    if (n > (PY_SSIZE_T_MAX - 2) / 6)
        return PyErr_NoMemory();
    Array cands = {NULL, 0, 0}, kinds = {NULL, 0, 0};
    Py_ssize_t records = 0, len = -2;
    PyThreadState *released = gil_release(n);
    char *buf = PyMem_RawMalloc((size_t)json_bound(s, n));
    if (buf != NULL)
        len = write_lines(s, n, partial, base, buf, &records, &cands, &kinds);
    gil_back(released);
    PyObject *out = NULL, *list = NULL, *result = NULL;
    int spliceable = splice == 1 || splice == 2 || splice == 3;
    if (len == -1) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (len < 0) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(buf, len);
    if (out == NULL)
        goto done;
    for (Py_ssize_t k = 0; spliceable && splice != 3 && k < kinds.len; k++)
        spliceable = kinds.v[k] == 1 || (kinds.v[k] == 2 && splice == 2);
    if (spliceable) {
        PyObject *objects = splice == 3 ? PyBytes_FromStringAndSize(NULL, 0) : spliced_objects(s, &cands);
        if (objects == NULL)
            Py_DECREF(out);
        else
            result = Py_BuildValue("(NnNN)", out, records, PyList_New(0), objects);
        goto done;
    }
    list = PyList_New(kinds.len);
    for (Py_ssize_t k = 0; list != NULL && k < kinds.len; k++) {
        Py_ssize_t *c = cands.v + 3 * k;
        PyObject *item = Py_BuildValue("(nNn)", c[0],
                                       PyBytes_FromStringAndSize((const char *)s + c[1], c[2] - c[1]), kinds.v[k]);
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, k, item);
    }
    if (list != NULL)
        result = Py_BuildValue("(NnNO)", out, records, list, Py_None);
    else
        Py_DECREF(out);
done:
    PyMem_RawFree(buf);
    PyMem_RawFree(cands.v);
    PyMem_RawFree(kinds.v);
    return result;
}

/* -- pack_commands ------------------------------------------------------------------------ */

/* Decimal digits of v into buf (at least 21 bytes), returns their count. */
static Py_ssize_t put_int(char *buf, long long v) {
    char tmp[24];
    Py_ssize_t n = 0, k = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        buf[k++] = '-';
    while (n)
        buf[k++] = tmp[--n];
    return k;
}

/* One argument's bytes: a pointer into the object or into `num` (digits of an int), or into
 * *owned (a float's repr, to be freed). 0, or -1 to give up (the caller returns None). */
static int arg_bytes(PyObject *a, char num[24], const char **data, Py_ssize_t *len, char **owned) {
    *data = NULL;
    if (PyBytes_CheckExact(a)) {
        *data = PyBytes_AS_STRING(a);
        *len = PyBytes_GET_SIZE(a);
    } else if (PyUnicode_CheckExact(a)) {
        *data = PyUnicode_AsUTF8AndSize(a, len);
    } else if (PyLong_CheckExact(a)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
        if (!overflow && !(v == -1 && PyErr_Occurred())) {
            *len = put_int(num, v);
            *data = num;
        }
    } else if (PyFloat_CheckExact(a)) {
        *owned = PyOS_double_to_string(PyFloat_AS_DOUBLE(a), 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (*owned != NULL) {
            *data = *owned;
            *len = (Py_ssize_t)strlen(*owned);
        }
    }
    if (*data == NULL) {
        PyErr_Clear(); /* surrogates, an int beyond 64 bits, no memory: packed in Python */
        return -1;
    }
    return 0;
}

/* "<c><n>\r\n" at w; returns the end. */
static char *put_header(char *w, char c, Py_ssize_t n) {
    *w++ = c;
    w += put_int(w, (long long)n);
    *w++ = '\r';
    *w++ = '\n';
    return w;
}

/* Two passes over the arguments: the size, then the bytes (a float's repr made twice). */
static PyObject *pack_commands(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyList_CheckExact(arg))
        Py_RETURN_NONE;
    PyObject *out = NULL;
    char *w = NULL;
    for (int pass = 0; pass < 2; pass++) {
        Py_ssize_t size = 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arg); i++) {
            PyObject *cmd = PyList_GET_ITEM(arg, i);
            if (!PyTuple_CheckExact(cmd) && !PyList_CheckExact(cmd)) {
                Py_XDECREF(out);
                Py_RETURN_NONE;
            }
            Py_ssize_t argc = PySequence_Fast_GET_SIZE(cmd);
            PyObject **items = PySequence_Fast_ITEMS(cmd);
            if (pass)
                w = put_header(w, '*', argc);
            else
                size += 1 + 20 + 2;
            for (Py_ssize_t j = 0; j < argc; j++) {
                char num[24];
                const char *data;
                Py_ssize_t len;
                char *owned = NULL;
                if (arg_bytes(items[j], num, &data, &len, &owned) < 0) {
                    Py_XDECREF(out);
                    Py_RETURN_NONE;
                }
                if (pass) {
                    w = put_header(w, '$', len);
                    memcpy(w, data, (size_t)len);
                    w += len;
                    *w++ = '\r';
                    *w++ = '\n';
                } else {
                    size += 1 + 20 + 2 + len + 2;
                }
                PyMem_Free(owned);
            }
        }
        if (!pass) {
            out = PyBytes_FromStringAndSize(NULL, size);
            if (out == NULL)
                return NULL;
            w = PyBytes_AS_STRING(out);
        }
    }
    if (_PyBytes_Resize(&out, w - PyBytes_AS_STRING(out)) < 0)
        return NULL;
    return out;
}

/* -- lone lines ---------------------------------------------------------------------------- */

/* "<digits>" of a capture time in microseconds (>= 0), as sidecar.protocol.ts_json writes it:
 * seconds, a dot, the microseconds without trailing zeros ("0" for none). */
static char *put_ts(char *w, long long us) {
    w += put_int(w, us / 1000000);
    *w++ = '.';
    long long frac = us % 1000000;
    if (frac == 0) {
        *w++ = '0';
        return w;
    }
    char digits[6];
    for (int k = 5; k >= 0; k--) {
        digits[k] = (char)('0' + frac % 10);
        frac /= 10;
    }
    int len = 6;
    while (digits[len - 1] == '0')
        len--;
    memcpy(w, digits, (size_t)len);
    return w + len;
}

static PyObject *lone_payload(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data, *head, *when;
    Py_ssize_t seq, max_records, threshold;
    int splice, overflow = 0;
    if (!PyArg_ParseTuple(args, "SSnO!inn", &data, &head, &seq, &PyLong_Type, &when, &splice, &max_records,
                          &threshold))
        return NULL;
    long long us = PyLong_AsLongLongAndOverflow(when, &overflow); /* a time beyond 64 bits: Python's path */
    if (us == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), hn = PyBytes_GET_SIZE(head);
    if (n == 0 || s[n - 1] != '\n' || overflow || us < 0 || seq < 0 || splice < 1 || splice > 3 ||
        n > (PY_SSIZE_T_MAX - 2) / 6)
        Py_RETURN_NONE;
    Array cands = {NULL, 0, 0}, kinds = {NULL, 0, 0};
    Py_ssize_t records = 0, len = -2;
    PyObject *out = NULL;
    char *buf = PyMem_RawMalloc((size_t)json_bound(s, n));
    if (buf != NULL)
        len = write_lines(s, n, 0, 0, buf, &records, &cands, &kinds);
    if (len == -2) {
        PyErr_NoMemory();
        goto done;
    }
    int ok = len >= 0 && records <= max_records;
    for (Py_ssize_t k = 0; ok && splice != 3 && k < kinds.len; k++)
        ok = kinds.v[k] == 1 || (kinds.v[k] == 2 && splice == 2);
    if (!ok) {
        out = Py_None;
        Py_INCREF(out);
        goto done;
    }
    Py_ssize_t objects = splice != 3 ? objects_bound(&cands) : 0; /* the json array's bytes at most */
    Py_ssize_t size = hn + 16 + 20 + 5 + 20 + 10 + len + 12 + 24 + 2 + (objects ? 10 + objects : 0) + 1;
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (payload == NULL)
        goto done;
    char *w = PyBytes_AS_STRING(payload);
    memcpy(w, PyBytes_AS_STRING(head), (size_t)hn);
    w += hn;
    memcpy(w, ",\"seq\":", 7);
    w = decimal(w + 7, seq);
    memcpy(w, ",\"n\":", 5);
    w = decimal(w + 5, records);
    memcpy(w, ",\"lines\":[", 10);
    w += 10;
    memcpy(w, buf, (size_t)len);
    w += len;
    memcpy(w, "],\"ts\":[[0,", 11);
    w = put_ts(w + 11, us);
    *w++ = ']';
    *w++ = ']';
    if (objects) {
        memcpy(w, ",\"json\":[", 9);
        w = write_objects(w + 9, s, &cands);
        *w++ = ']';
    }
    *w++ = '}';
    if (_PyBytes_Resize(&payload, w - PyBytes_AS_STRING(payload)) < 0)
        goto done;
    if (threshold >= 0 && PyBytes_GET_SIZE(payload) > threshold) {
        Py_DECREF(payload);
        out = Py_None;
        Py_INCREF(out);
        goto done;
    }
    out = Py_BuildValue("(Nn)", payload, records);
done:
    PyMem_RawFree(buf);
    PyMem_RawFree(cands.v);
    PyMem_RawFree(kinds.v);
    return out;
}

/* Where a simple reply (+, -, :) that starts at buf[i] ends (after its CRLF); 0 when it is not
 * complete in buf[..n], -1 when it is of another type. */
static Py_ssize_t simple_reply_end(const char *buf, Py_ssize_t i, Py_ssize_t n) {
    if (i >= n)
        return 0;
    if (buf[i] != '+' && buf[i] != '-' && buf[i] != ':')
        return -1;
    const char *lf = memchr(buf + i, '\n', (size_t)(n - i));
    return lf == NULL ? 0 : lf - buf + 1;
}

/* Waits up to timeout_ms (< 0: no limit) for fd to be ready; 0, or an errno value. */
static int wait_fd(int fd, short events, int timeout_ms) {
    struct pollfd p = {fd, events, 0};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r > 0)
            return 0;
        if (r == 0)
            return ETIMEDOUT;
        if (errno != EINTR)
            return errno;
    }
}

static PyObject *lone_exchange(PyObject *self, PyObject *args) {
    (void)self;
    int fd, timeout_ms;
    PyObject *prefix, *payload, *suffix;
    long long first, last;
    if (!PyArg_ParseTuple(args, "iSLLSSi", &fd, &prefix, &first, &last, &payload, &suffix, &timeout_ms))
        return NULL;
    Py_ssize_t pn = PyBytes_GET_SIZE(prefix), dn = PyBytes_GET_SIZE(payload), sn = PyBytes_GET_SIZE(suffix);
    if (dn > PY_SSIZE_T_MAX - pn - sn - 128)
        return PyErr_NoMemory();
    char *cmd = PyMem_RawMalloc((size_t)(pn + sn + dn + 128));
    if (cmd == NULL)
        return PyErr_NoMemory();
    char *w = cmd, num[24];
    memcpy(w, PyBytes_AS_STRING(prefix), (size_t)pn);
    w += pn;
    long long args2[2] = {first, last};
    for (int k = 0; k < 2; k++) {
        Py_ssize_t len = put_int(num, args2[k]);
        w = put_header(w, '$', len);
        memcpy(w, num, (size_t)len);
        w += len;
        *w++ = '\r';
        *w++ = '\n';
    }
    w = put_header(w, '$', dn);
    memcpy(w, PyBytes_AS_STRING(payload), (size_t)dn);
    w += dn;
    *w++ = '\r';
    *w++ = '\n';
    memcpy(w, PyBytes_AS_STRING(suffix), (size_t)sn);
    w += sn;
    char reply[512];
    Py_ssize_t got = 0, end1 = 0, end2 = 0;
    int err = 0;
    PyThreadState *released = PyEval_SaveThread();
    for (const char *p = cmd; p < w && !err;) {
        ssize_t k = send(fd, p, (size_t)(w - p), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k >= 0)
            p += k;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            err = wait_fd(fd, POLLOUT, timeout_ms);
        else if (errno != EINTR)
            err = errno;
    }
    if (!err) /* the replies take a round trip: wait for them rather than try a read first */
        err = wait_fd(fd, POLLIN, timeout_ms);
    while (!err) {
        end1 = simple_reply_end(reply, 0, got);
        end2 = end1 > 0 ? simple_reply_end(reply, end1, got) : 0;
        if (end1 < 0 || end2 != 0 || got == (Py_ssize_t)sizeof reply)
            break; /* both replies, or not what this reads: the caller reads on */
        ssize_t k = recv(fd, reply + got, sizeof reply - (size_t)got, MSG_DONTWAIT);
        if (k > 0)
            got += k;
        else if (k == 0)
            err = ECONNRESET;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            err = wait_fd(fd, POLLIN, timeout_ms);
        else if (errno != EINTR)
            err = errno;
    }
    PyEval_RestoreThread(released);
    PyMem_RawFree(cmd);
    if (err)
        return Py_BuildValue("(ii)", 1, err);
    if (end2 == got && end1 == 7 && memcmp(reply, "+PONG\r\n", 7) == 0 && reply[7] == ':')
        return Py_BuildValue("(iO)", 0, Py_None);
    return Py_BuildValue("(iy#)", 2, reply, got);
}

static PyObject *set_child_subreaper(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#if defined(__linux__) && defined(PR_SET_CHILD_SUBREAPER)
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"token_starts", token_starts, METH_O, "Positions where a token prefix may begin (sorted)."},
    {"count_lf", count_lf, METH_O, "How many LF bytes the data holds."},
    {"contains_any", contains_any, METH_VARARGS, "Whether any of the needles occurs in the data."},
    {"lines_json", lines_json, METH_VARARGS, "Records of a segment as comma-joined JSON strings."},
    {"lone_payload", lone_payload, METH_VARARGS, "The batch message of one run of whole lines, or None."},
    {"lone_exchange", lone_exchange, METH_VARARGS, "PING and one append on a socket, and their replies."},
    {"pack_commands", pack_commands, METH_O, "Commands in RESP, as sidecar.resp.pack_py packs each; None to pack in Python."},
    {"set_child_subreaper", set_child_subreaper, METH_NOARGS, "prctl(PR_SET_CHILD_SUBREAPER, 1); False if refused."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "Native loops of the sidecar's data path.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_tables();
    return PyModule_Create(&module);
}
