/* Optional C fast path for tinyllm's byte-level BPE (built by setup.py; optional=True).
 *
 * It does exactly what the readable Python in train.py / bpe.py does, only faster:
 *   learn_merges(words, counts, num_merges, verbose) -> [(a, b), ...]
 *       the incremental trainer: pair counts + where-lists + max-heap with lazy invalidation,
 *       tie-break: highest count, then smallest (left id, right id); merge i makes id 256 + i.
 *   Encoder(byte_ids, merges).encode_chunks(list[str]) -> list[int]
 *       per-chunk BPE by merge rank, with a chunk cache.
 * The Python versions are the reference; tests check both give identical results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ pair hash table */
/* open addressing, linear probing; key = (a << 32) | b, value = index into a side array */

typedef struct {
    uint64_t *keys;   /* EMPTY_KEY when free */
    int32_t *vals;
    size_t cap;       /* power of two */
    size_t len;
} PairMap;

#define EMPTY_KEY UINT64_MAX

static inline uint64_t pair_key(uint32_t a, uint32_t b) { return ((uint64_t)a << 32) | b; }

static inline size_t hash64(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return (size_t)k;
}

static int pm_init(PairMap *m, size_t cap) {
    size_t c = 16;
    while (c < cap * 2) c <<= 1;
    m->keys = (uint64_t *)malloc(c * sizeof(uint64_t));
    m->vals = (int32_t *)malloc(c * sizeof(int32_t));
    if (!m->keys || !m->vals) return -1;
    memset(m->keys, 0xff, c * sizeof(uint64_t));
    m->cap = c;
    m->len = 0;
    return 0;
}

static void pm_free(PairMap *m) { free(m->keys); free(m->vals); m->keys = NULL; m->vals = NULL; }

static inline int32_t pm_get(const PairMap *m, uint64_t k) {
    size_t mask = m->cap - 1, i = hash64(k) & mask;
    while (m->keys[i] != EMPTY_KEY) {
        if (m->keys[i] == k) return m->vals[i];
        i = (i + 1) & mask;
    }
    return -1;
}

static int pm_grow(PairMap *m) {
    PairMap n;
    if (pm_init(&n, m->cap) < 0) return -1;  /* pm_init doubles */
    for (size_t i = 0; i < m->cap; i++) {
        if (m->keys[i] == EMPTY_KEY) continue;
        size_t mask = n.cap - 1, j = hash64(m->keys[i]) & mask;
        while (n.keys[j] != EMPTY_KEY) j = (j + 1) & mask;
        n.keys[j] = m->keys[i];
        n.vals[j] = m->vals[i];
    }
    n.len = m->len;
    pm_free(m);
    *m = n;
    return 0;
}

/* insert k -> v (k must be absent) */
static int pm_put(PairMap *m, uint64_t k, int32_t v) {
    if ((m->len + 1) * 2 > m->cap && pm_grow(m) < 0) return -1;
    size_t mask = m->cap - 1, i = hash64(k) & mask;
    while (m->keys[i] != EMPTY_KEY) i = (i + 1) & mask;
    m->keys[i] = k;
    m->vals[i] = v;
    m->len++;
    return 0;
}

/* ------------------------------------------------------------------ trainer state */

typedef struct {
    uint32_t a, b;
    int64_t count;
    int64_t old_count;  /* count before the current merge touched it */
    int64_t stamp;      /* merge number that last touched it (dedupes the touched list) */
    int32_t *where;     /* words that (may) contain the pair; lazily stale */
    int32_t wlen, wcap;
} Pair;

typedef struct {
    int64_t count;
    uint32_t a, b;
} HeapItem;

typedef struct {
    PairMap map;
    Pair *pairs;
    size_t npairs, cap;
    HeapItem *heap;
    size_t hlen, hcap;
} Stats;

/* heap order: higher count first, then smaller a, then smaller b */
static inline int heap_before(const HeapItem *x, const HeapItem *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static int heap_push(Stats *s, int64_t count, uint32_t a, uint32_t b) {
    if (s->hlen == s->hcap) {
        size_t nc = s->hcap ? s->hcap * 2 : 1024;
        HeapItem *h = (HeapItem *)realloc(s->heap, nc * sizeof(HeapItem));
        if (!h) return -1;
        s->heap = h;
        s->hcap = nc;
    }
    HeapItem it = {count, a, b};
    size_t i = s->hlen++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_before(&it, &s->heap[p])) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = it;
    return 0;
}

static HeapItem heap_pop(Stats *s) {
    HeapItem top = s->heap[0], last = s->heap[--s->hlen];
    size_t i = 0, n = s->hlen;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        const HeapItem *bv = &last;
        if (l < n && heap_before(&s->heap[l], bv)) { best = l; bv = &s->heap[l]; }
        if (r < n && heap_before(&s->heap[r], bv)) { best = r; }
        if (best == i) break;
        s->heap[i] = s->heap[best];
        i = best;
    }
    if (n > 0) s->heap[i] = last;
    return top;
}

/* index of pair (a, b), created with count 0 if absent; -1 on OOM */
static int32_t get_pair(Stats *s, uint32_t a, uint32_t b) {
    uint64_t k = pair_key(a, b);
    int32_t idx = pm_get(&s->map, k);
    if (idx >= 0) return idx;
    if (s->npairs == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 4096;
        Pair *p = (Pair *)realloc(s->pairs, nc * sizeof(Pair));
        if (!p) return -1;
        s->pairs = p;
        s->cap = nc;
    }
    idx = (int32_t)s->npairs++;
    Pair *p = &s->pairs[idx];
    p->a = a; p->b = b; p->count = 0; p->old_count = 0; p->stamp = -1;
    p->where = NULL; p->wlen = 0; p->wcap = 0;
    if (pm_put(&s->map, k, idx) < 0) return -1;
    return idx;
}

static int where_add(Pair *p, int32_t w) {
    if (p->wlen && p->where[p->wlen - 1] == w) return 0;  /* same word again */
    if (p->wlen == p->wcap) {
        int32_t nc = p->wcap ? p->wcap * 2 : 4;
        int32_t *nw = (int32_t *)realloc(p->where, (size_t)nc * sizeof(int32_t));
        if (!nw) return -1;
        p->where = nw;
        p->wcap = nc;
    }
    p->where[p->wlen++] = w;
    return 0;
}

static void stats_free(Stats *s) {
    for (size_t i = 0; i < s->npairs; i++) free(s->pairs[i].where);
    free(s->pairs);
    free(s->heap);
    pm_free(&s->map);
}

/* ------------------------------------------------------------------ learn_merges */

static PyObject *learn_merges(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *words_obj, *counts_obj;
    Py_ssize_t num_merges;
    int verbose = 0;
    if (!PyArg_ParseTuple(args, "OOn|p", &words_obj, &counts_obj, &num_merges, &verbose))
        return NULL;
    PyObject *words_seq = PySequence_Fast(words_obj, "words must be a sequence of bytes");
    if (!words_seq) return NULL;
    PyObject *counts_seq = PySequence_Fast(counts_obj, "counts must be a sequence of ints");
    if (!counts_seq) { Py_DECREF(words_seq); return NULL; }
    Py_ssize_t nw = PySequence_Fast_GET_SIZE(words_seq);
    if (PySequence_Fast_GET_SIZE(counts_seq) != nw) {
        PyErr_SetString(PyExc_ValueError, "words and counts differ in length");
        Py_DECREF(words_seq); Py_DECREF(counts_seq);
        return NULL;
    }

    /* words: one flat array of symbols, word w at sym[off[w] .. off[w] + len[w]) */
    int64_t *off = (int64_t *)malloc((size_t)(nw + 1) * sizeof(int64_t));
    int32_t *wlen = (int32_t *)malloc((size_t)(nw + 1) * sizeof(int32_t));
    int64_t *wcount = (int64_t *)malloc((size_t)(nw + 1) * sizeof(int64_t));
    int64_t *wstamp = (int64_t *)malloc((size_t)(nw + 1) * sizeof(int64_t));
    uint32_t *sym = NULL, *tmp = NULL;
    int32_t *touched = NULL;
    size_t ntouched = 0, touched_cap = 0;
    Stats s;
    memset(&s, 0, sizeof(s));
    PyObject *result = NULL;
    if (!off || !wlen || !wcount || !wstamp) goto oom;
    int64_t total = 0;
    for (Py_ssize_t w = 0; w < nw; w++) {
        PyObject *b = PySequence_Fast_GET_ITEM(words_seq, w);
        if (!PyBytes_Check(b)) { PyErr_SetString(PyExc_TypeError, "words must be bytes"); goto fail; }
        off[w] = total;
        wlen[w] = (int32_t)PyBytes_GET_SIZE(b);
        total += wlen[w];
        wcount[w] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(counts_seq, w));
        if (wcount[w] == -1 && PyErr_Occurred()) goto fail;
        wstamp[w] = -1;
    }
    sym = (uint32_t *)malloc((size_t)(total + 1) * sizeof(uint32_t));
    tmp = (uint32_t *)malloc((size_t)(total + 1) * sizeof(uint32_t));
    if (!sym || !tmp) goto oom;
    int32_t maxlen = 0;
    for (Py_ssize_t w = 0; w < nw; w++) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(words_seq, w));
        for (int32_t i = 0; i < wlen[w]; i++) sym[off[w] + i] = p[i];
        if (wlen[w] > maxlen) maxlen = wlen[w];
    }

    /* initial pair statistics */
    if (pm_init(&s.map, 1 << 16) < 0) goto oom;
    for (Py_ssize_t w = 0; w < nw; w++) {
        uint32_t *x = sym + off[w];
        for (int32_t i = 0; i + 1 < wlen[w]; i++) {
            int32_t idx = get_pair(&s, x[i], x[i + 1]);
            if (idx < 0) goto oom;
            s.pairs[idx].count += wcount[w];
            if (where_add(&s.pairs[idx], (int32_t)w) < 0) goto oom;
        }
    }
    for (size_t i = 0; i < s.npairs; i++)
        if (s.pairs[i].count > 0 && heap_push(&s, s.pairs[i].count, s.pairs[i].a, s.pairs[i].b) < 0)
            goto oom;

    result = PyList_New(0);
    if (!result) goto fail;
    Py_ssize_t done = 0;
    while (done < num_merges && s.hlen > 0) {
        HeapItem top = heap_pop(&s);
        int32_t pidx = pm_get(&s.map, pair_key(top.a, top.b));
        if (pidx < 0 || s.pairs[pidx].count != top.count || top.count <= 0) continue;  /* stale */
        uint32_t a = top.a, b = top.b, nid = (uint32_t)(256 + done);
        int64_t stamp = done;
        PyObject *t = Py_BuildValue("(II)", a, b);
        if (!t || PyList_Append(result, t) < 0) { Py_XDECREF(t); goto fail; }
        Py_DECREF(t);
        done++;

        /* take the where-list: the merged pair never occurs again */
        int32_t *where = s.pairs[pidx].where;
        int32_t nwhere = s.pairs[pidx].wlen;
        s.pairs[pidx].where = NULL; s.pairs[pidx].wlen = 0; s.pairs[pidx].wcap = 0;
        ntouched = 0;
        for (int32_t k = 0; k < nwhere; k++) {
            int32_t w = where[k];
            if (wstamp[w] == stamp) continue;  /* listed twice */
            wstamp[w] = stamp;
            uint32_t *x = sym + off[w];
            int32_t n = wlen[w], m = 0;
            int found = 0;
            for (int32_t i = 0; i + 1 < n; i++)
                if (x[i] == a && x[i + 1] == b) { found = 1; break; }
            if (!found) continue;  /* stale where entry */
            int64_t c = wcount[w];
            /* merge into tmp, left to right */
            for (int32_t i = 0; i < n;) {
                if (i + 1 < n && x[i] == a && x[i + 1] == b) { tmp[m++] = nid; i += 2; }
                else tmp[m++] = x[i++];
            }
            /* old pairs out, new pairs in (count deltas; the heap is fixed up after) */
            for (int pass = 0; pass < 2; pass++) {
                const uint32_t *y = pass ? tmp : x;
                int32_t len = pass ? m : n;
                for (int32_t i = 0; i + 1 < len; i++) {
                    int32_t q = get_pair(&s, y[i], y[i + 1]);
                    if (q < 0) goto oom_where;
                    Pair *p = &s.pairs[q];
                    if (p->stamp != stamp) {
                        p->stamp = stamp;
                        p->old_count = p->count;
                        if (ntouched == touched_cap) {
                            size_t nc = touched_cap ? touched_cap * 2 : 1024;
                            int32_t *nt = (int32_t *)realloc(touched, nc * sizeof(int32_t));
                            if (!nt) goto oom_where;
                            touched = nt;
                            touched_cap = nc;
                        }
                        touched[ntouched++] = q;
                    }
                    if (pass) {
                        p->count += c;
                        if (where_add(p, w) < 0) goto oom_where;
                    } else {
                        p->count -= c;
                    }
                }
            }
            memcpy(x, tmp, (size_t)m * sizeof(uint32_t));
            wlen[w] = m;
        }
        free(where);
        for (size_t k = 0; k < ntouched; k++) {
            Pair *p = &s.pairs[touched[k]];
            if (p->count != p->old_count && p->count > 0 && !(p->a == a && p->b == b))
                if (heap_push(&s, p->count, p->a, p->b) < 0) goto oom;
        }
        s.pairs[pidx].count = 0;
        if (verbose && (done % 1000 == 0 || done == num_merges)) {
            PySys_WriteStderr("\rmerges: %zd/%zd, last count %lld", done, num_merges,
                              (long long)top.count);
        }
        continue;
    oom_where:
        free(where);
        goto oom;
    }
    if (verbose) PySys_WriteStderr("\n");
    goto cleanup;

oom:
    PyErr_NoMemory();
fail:
    Py_CLEAR(result);
cleanup:
    free(off); free(wlen); free(wcount); free(wstamp); free(sym); free(tmp); free(touched);
    if (s.map.keys) stats_free(&s);
    Py_DECREF(words_seq);
    Py_DECREF(counts_seq);
    return result;
}

/* ------------------------------------------------------------------ Encoder */

typedef struct {
    PyObject_HEAD
    uint32_t byte_ids[256];
    PairMap ranks;      /* pair -> index into rank_new */
    uint32_t *merge_new; /* new id of merge rank r */
    PyObject *cache;    /* dict: chunk str -> bytes (packed uint32 ids) */
    uint32_t *buf;      /* scratch for one chunk */
    size_t bufcap;
} Encoder;

#define CACHE_MAX (1 << 18)

static void Encoder_dealloc(Encoder *self) {
    pm_free(&self->ranks);
    free(self->merge_new);
    free(self->buf);
    Py_XDECREF(self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds) {
    (void)kwds;
    PyObject *byte_ids, *merges;
    if (!PyArg_ParseTuple(args, "OO", &byte_ids, &merges)) return -1;
    PyObject *bseq = PySequence_Fast(byte_ids, "byte_ids must be a sequence");
    if (!bseq) return -1;
    if (PySequence_Fast_GET_SIZE(bseq) != 256) {
        Py_DECREF(bseq);
        PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 entries");
        return -1;
    }
    for (int i = 0; i < 256; i++)
        self->byte_ids[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(bseq, i));
    Py_DECREF(bseq);
    if (PyErr_Occurred()) return -1;
    PyObject *mseq = PySequence_Fast(merges, "merges must be a sequence");
    if (!mseq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(mseq);
    if (pm_init(&self->ranks, (size_t)n + 16) < 0) { Py_DECREF(mseq); PyErr_NoMemory(); return -1; }
    self->merge_new = (uint32_t *)malloc((size_t)(n + 1) * sizeof(uint32_t));
    self->cache = PyDict_New();
    if (!self->merge_new || !self->cache) { Py_DECREF(mseq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t r = 0; r < n; r++) {
        unsigned int a, b, nid;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(mseq, r), "III", &a, &b, &nid)) {
            Py_DECREF(mseq);
            return -1;
        }
        self->merge_new[r] = nid;
        uint64_t k = pair_key(a, b);
        if (pm_get(&self->ranks, k) < 0 && pm_put(&self->ranks, k, (int32_t)r) < 0) {
            Py_DECREF(mseq);
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_DECREF(mseq);
    return 0;
}

/* BPE on one chunk's bytes; returns a new bytes object of packed uint32 ids */
static PyObject *bpe_chunk(Encoder *self, const unsigned char *s, Py_ssize_t n) {
    if ((size_t)n > self->bufcap) {
        size_t nc = (size_t)n * 2;
        uint32_t *nb = (uint32_t *)realloc(self->buf, nc * sizeof(uint32_t));
        if (!nb) return PyErr_NoMemory();
        self->buf = nb;
        self->bufcap = nc;
    }
    uint32_t *x = self->buf;
    for (Py_ssize_t i = 0; i < n; i++) x[i] = self->byte_ids[s[i]];
    while (n >= 2) {
        int32_t best = INT32_MAX;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            int32_t r = pm_get(&self->ranks, pair_key(x[i], x[i + 1]));
            if (r >= 0 && r < best) best = r;
        }
        if (best == INT32_MAX) break;
        /* the pair of rank `best`: merge all its occurrences, left to right, in place */
        Py_ssize_t m = 0;
        uint32_t nid = self->merge_new[best];
        for (Py_ssize_t i = 0; i < n;) {
            if (i + 1 < n && pm_get(&self->ranks, pair_key(x[i], x[i + 1])) == best) {
                x[m++] = nid;
                i += 2;
            } else {
                x[m++] = x[i++];
            }
        }
        n = m;
    }
    return PyBytes_FromStringAndSize((const char *)x, n * (Py_ssize_t)sizeof(uint32_t));
}

static PyObject *chunk_utf8(PyObject *chunk) {
    /* like train.text_to_bytes: strict, then surrogateescape, then surrogatepass */
    PyObject *b = PyUnicode_AsEncodedString(chunk, "utf-8", "strict");
    if (b) return b;
    PyErr_Clear();
    b = PyUnicode_AsEncodedString(chunk, "utf-8", "surrogateescape");
    if (b) return b;
    PyErr_Clear();
    return PyUnicode_AsEncodedString(chunk, "utf-8", "surrogatepass");
}

static PyObject *Encoder_encode_chunks(Encoder *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "chunks must be a sequence of str");
    if (!seq) return NULL;
    Py_ssize_t nc = PySequence_Fast_GET_SIZE(seq);
    size_t cap = (size_t)nc + 16, len = 0;
    uint32_t *out = (uint32_t *)malloc(cap * sizeof(uint32_t));
    if (!out) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t k = 0; k < nc; k++) {
        PyObject *chunk = PySequence_Fast_GET_ITEM(seq, k);
        PyObject *packed = PyDict_GetItemWithError(self->cache, chunk); /* borrowed */
        if (packed) {
            Py_INCREF(packed);
        } else {
            if (PyErr_Occurred()) goto fail;
            const char *s;
            Py_ssize_t n;
            PyObject *tmpb = NULL;
            if (PyUnicode_Check(chunk) && (s = PyUnicode_AsUTF8AndSize(chunk, &n)) != NULL) {
            } else {
                PyErr_Clear();
                tmpb = chunk_utf8(chunk);
                if (!tmpb) goto fail;
                s = PyBytes_AS_STRING(tmpb);
                n = PyBytes_GET_SIZE(tmpb);
            }
            packed = bpe_chunk(self, (const unsigned char *)s, n);
            Py_XDECREF(tmpb);
            if (!packed) goto fail;
            if (PyDict_GET_SIZE(self->cache) >= CACHE_MAX) PyDict_Clear(self->cache);
            if (PyDict_SetItem(self->cache, chunk, packed) < 0) { Py_DECREF(packed); goto fail; }
        }
        size_t m = (size_t)PyBytes_GET_SIZE(packed) / sizeof(uint32_t);
        if (len + m > cap) {
            while (len + m > cap) cap *= 2;
            uint32_t *no = (uint32_t *)realloc(out, cap * sizeof(uint32_t));
            if (!no) { Py_DECREF(packed); PyErr_NoMemory(); goto fail; }
            out = no;
        }
        memcpy(out + len, PyBytes_AS_STRING(packed), m * sizeof(uint32_t));
        len += m;
        Py_DECREF(packed);
    }
    Py_DECREF(seq);
    PyObject *list = PyList_New((Py_ssize_t)len);
    if (!list) { free(out); return NULL; }
    for (size_t i = 0; i < len; i++) {
        PyObject *v = PyLong_FromUnsignedLong(out[i]);
        if (!v) { free(out); Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    free(out);
    return list;
fail:
    free(out);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef Encoder_methods[] = {
    {"encode_chunks", (PyCFunction)Encoder_encode_chunks, METH_O,
     "encode_chunks(chunks: list[str]) -> list[int]: BPE each chunk (cached), concatenated."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tinyllm.tokenizer._fastbpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges): merges are (left, right, new) in priority order.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

static PyMethodDef module_methods[] = {
    {"learn_merges", learn_merges, METH_VARARGS,
     "learn_merges(words: list[bytes], counts: list[int], num_merges: int, verbose=False)"
     " -> list[tuple[int, int]]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_fastbpe", "C fast path for tinyllm's BPE tokenizer.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastbpe(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
