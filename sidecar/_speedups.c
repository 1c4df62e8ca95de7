/*
 * Native versions of two per-byte loops of the data path. Each returns exactly what its
 * Python counterpart returns (tests/unit/test_speedups.py compares them on fuzzed input);
 * the sidecar uses the Python code when this module is not built or SIDECAR_PURE_PYTHON is set.
 *
 *   token_starts(data: bytes) -> list[int]
 *       sidecar.redaction._token_starts: where a token prefix may begin.
 *
 *   contains_any(data: bytes, needles: tuple[bytes, ...]) -> bool
 *       any(n in data for n in needles), as redaction asks of every read for the forms of the
 *       environment's secrets.
 *
 *   lines_json(data: bytes, partial: bool, base: int)  (bytes only, not other buffers)
 *           -> tuple[bytes, int, list[tuple[int, bytes, int]]] | None
 *       The records of one segment (sidecar.protocol.texts_of) as JSON strings joined by
 *       commas, as orjson writes them; the record count; and for each record that may be a
 *       JSON object (it begins with "{" and, without trailing CRs, ends with "}"): base + its
 *       index, its text without those CRs, and its kind: 0 when orjson must decide, 1 for a
 *       JSON object that orjson reads too, 2 for one that may also carry an agent event (a
 *       top-level key "usage" or "sidecar_event", or one written with escapes). None when a
 *       record is not valid UTF-8, or a segment of whole lines does not end with LF: the
 *       caller then takes the Python path.
 *
 * Both only read `data` and write into buffers sized before the first write.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* -- token_starts ------------------------------------------------------------------------ */

/* In sidecar.redaction, the folding table maps o u s r a b to p: a folded "p" stands for any
 * of these. */
static int folds_to_p(unsigned char c) {
    return c == 'p' || c == 'o' || c == 'u' || c == 's' || c == 'r' || c == 'a' || c == 'b';
}

static int prefix_at(const unsigned char *s, Py_ssize_t left) {
    switch (s[0]) {
    case 's': /* sk- */
        return left >= 3 && s[1] == 'k' && s[2] == '-';
    case 'g': /* github_pat_, or gh?_ (folded ghp_) */
        if (left >= 4 && s[1] == 'h' && folds_to_p(s[2]) && s[3] == '_')
            return 1;
        return left >= 11 && memcmp(s, "github_pat_", 11) == 0;
    case 'A': /* A?IA with ? in K S (folded AKIA) */
        return left >= 4 && (s[1] == 'K' || s[1] == 'S') && s[2] == 'I' && s[3] == 'A';
    case 'x': /* x?x?- (folded xpxp-) */
        return left >= 5 && folds_to_p(s[1]) && s[2] == 'x' && folds_to_p(s[3]) && s[4] == '-';
    default:
        return 0;
    }
}

/* Bytes a token prefix can begin with: s g A x. */
static unsigned char FIRST[256];

static PyObject *token_starts(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto fail;
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t x = load8(s + i);
            uint64_t hits = has_byte(x, 's') | has_byte(x, 'g') | has_byte(x, 'A') | has_byte(x, 'x');
            if (hits == 0) {
                i += 8;
                continue;
            }
            i += __builtin_ctzll(hits) >> 3; /* the lowest flagged byte is a true one */
        }
        if (FIRST[s[i]] && prefix_at(s + i, n - i)) {
            PyObject *pos = PyLong_FromSsize_t(i);
            if (pos == NULL || PyList_Append(out, pos) < 0) {
                Py_XDECREF(pos);
                Py_DECREF(out);
                goto fail;
            }
            Py_DECREF(pos);
        }
        i++;
    }
    PyBuffer_Release(&view);
    return out;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* -- contains_any ------------------------------------------------------------------------ */

/* contains_any(data: bytes, needles: tuple[bytes, ...]) -> bool: any(n in data for n in needles),
 * with glibc's memmem. */
static PyObject *contains_any(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data, *needles;
    if (!PyArg_ParseTuple(args, "SO!", &data, &PyTuple_Type, &needles))
        return NULL;
    const char *s = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t k = PyTuple_GET_SIZE(needles);
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, j);
        if (!PyBytes_Check(needle)) {
            PyErr_SetString(PyExc_TypeError, "contains_any: needles must be bytes");
            return NULL;
        }
        Py_ssize_t m = PyBytes_GET_SIZE(needle);
        if (m == 0 || (m <= n && memmem(s, (size_t)n, PyBytes_AS_STRING(needle), (size_t)m) != NULL))
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
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

/* For each byte: how many bytes it takes inside a JSON string (1 plain, 2 short escape, 6
 * \u00XX escape), or 0 for the first byte of a multi-byte UTF-8 sequence. */
static unsigned char OUT_LEN[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        if (c >= 0x80)
            OUT_LEN[c] = 0;
        else if (c == '"' || c == '\\' || c == '\b' || c == '\t' || c == '\n' || c == '\f' || c == '\r')
            OUT_LEN[c] = 2;
        else if (c < 0x20)
            OUT_LEN[c] = 6;
        else
            OUT_LEN[c] = 1;
        FIRST[c] = (c == 's' || c == 'g' || c == 'A' || c == 'x');
    }
}

static const char HEX[] = "0123456789abcdef";

static PyObject *lines_json(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data;
    int partial;
    Py_ssize_t base;
    /* bytes only: both passes read the same bytes even when the objects made between them
     * start a garbage collection that runs other code (a bytearray could change meanwhile) */
    if (!PyArg_ParseTuple(args, "Spn", &data, &partial, &base))
        return NULL;
    if (base < 0 || base > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "lines_json: base out of range");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    PyObject *cands = NULL, *result = NULL, *out = NULL;

    /* Pass 1: validate, count records, size the output, collect the "{" records. */
    if (!partial && (n == 0 || s[n - 1] != '\n'))
        goto fallback;
    cands = PyList_New(0);
    if (cands == NULL)
        goto fail;
    Py_ssize_t size = 0, records = 0, start = 0;
    Py_ssize_t end_all = partial ? n : n - 1; /* the last record ends here */
    Py_ssize_t i = 0;
    for (;;) {
        /* one record: [start, stop) */
        Py_ssize_t stop;
        if (partial) {
            stop = n;
        } else {
            const unsigned char *nl = memchr(s + start, '\n', (size_t)(n - start));
            if (nl == NULL) /* cannot happen: the data ends with LF */
                goto fallback;
            stop = nl - s;
        }
        size += 2 + (records ? 1 : 0); /* quotes, and the comma before it */
        for (i = start; i < stop;) {
            if (i + 8 <= stop) {
                uint64_t care = needs_care(load8(s + i));
                if (care == 0) {
                    size += 8;
                    i += 8;
                    continue;
                }
                Py_ssize_t plain = __builtin_ctzll(care) >> 3; /* bytes before the first to look at */
                size += plain;
                i += plain;
            }
            unsigned char k1 = OUT_LEN[s[i]];
            if (k1) {
                size += k1;
                i++;
            } else {
                Py_ssize_t k = utf8_len(s + i, stop - i);
                if (k == 0)
                    goto fallback;
                size += k;
                i += k;
            }
        }
        Py_ssize_t last = stop; /* the record without its trailing CRs */
        while (last > start && s[last - 1] == '\r')
            last--;
        if (last - start >= 2 && s[start] == '{' && s[last - 1] == '}') {
            PyObject *text = PyBytes_FromStringAndSize((const char *)s + start, last - start);
            if (text == NULL)
                goto fail;
            PyObject *pair = Py_BuildValue("(nNi)", base + records, text, json_object_kind(s + start, last - start));
            if (pair == NULL || PyList_Append(cands, pair) < 0) {
                Py_XDECREF(pair);
                goto fail;
            }
            Py_DECREF(pair);
        }
        records++;
        if (stop >= end_all)
            break;
        start = stop + 1;
    }

    /* Pass 2: write. */
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        goto fail;
    char *w = PyBytes_AS_STRING(out);
    const char *end = w + size;
    start = 0;
    for (Py_ssize_t r = 0; r < records; r++) {
        Py_ssize_t stop = n;
        if (!partial) {
            const unsigned char *nl = memchr(s + start, '\n', (size_t)(n - start));
            if (nl == NULL) /* cannot happen: pass 1 found it */
                goto overflow;
            stop = nl - s;
        }
        if (end - w < (r ? 3 : 2))
            goto overflow;
        if (r)
            *w++ = ',';
        *w++ = '"';
        for (i = start; i < stop; i++) {
            if (i + 8 <= stop && end - w >= 8) {
                uint64_t care = needs_care(load8(s + i));
                Py_ssize_t plain = care == 0 ? 8 : __builtin_ctzll(care) >> 3;
                memcpy(w, s + i, 8); /* the bytes past `plain` are written over next */
                w += plain;
                i += plain;
                if (care == 0) {
                    i--; /* the loop's i++ */
                    continue;
                }
            }
            unsigned char c = s[i];
            if (end - w < (OUT_LEN[c] ? OUT_LEN[c] : 1) + 1) /* this byte and the closing quote */
                goto overflow;
            if (OUT_LEN[c] != 2 && OUT_LEN[c] != 6) { /* plain ASCII, or a byte of valid UTF-8 */
                *w++ = (char)c;
                continue;
            }
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
        }
        if (end - w < 1)
            goto overflow;
        *w++ = '"';
        start = stop + 1;
    }
    if (w != end) {
    overflow: /* pass 1 and pass 2 disagree: a bug, never written past the buffer */
        PyErr_SetString(PyExc_SystemError, "lines_json: output size mismatch");
        goto fail;
    }
    result = Py_BuildValue("(NnN)", out, records, cands);
    return result;

fallback:
    Py_XDECREF(cands);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(cands);
    Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"token_starts", token_starts, METH_O, "Positions where a token prefix may begin (sorted)."},
    {"contains_any", contains_any, METH_VARARGS, "Whether any of the needles occurs in the data."},
    {"lines_json", lines_json, METH_VARARGS, "Records of a segment as comma-joined JSON strings."},
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
