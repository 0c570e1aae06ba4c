/* The data plane's per-layer exchange in C; see data_plane.h for the protocol.
 *
 * Why in C: on the Python channel a layer's round trip costs the two wake-ups plus, on each
 * side, a pickle, a poll loop and the tensor views around it (about 0.2 ms a layer here,
 * `infinite-llm bench channels`), paid 30 times a SmolLM2 step. Here the debtor's decoder
 * writes the rows into the shared region and rings the doorbell without leaving C, and the
 * creditor's channel server hands the doorbell to C, which stores, runs the MA and answers. */
#include "data_plane.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../attention/csrc/ma_call.h"

C_STRUCT_LAYOUT(RemoteLink, REMOTE_LINK)
C_STRUCT_LAYOUT(RemoteStep, REMOTE_STEP)
C_STRUCT_LAYOUT(ServeLink, SERVE_LINK)

#define ALIGN(x) (((x) + 63) & ~(int64_t)63)
#define PTR(T, x) ((T)(intptr_t)(x))

/* remote_step's failures (RemoteStep.status); the decoder sees STEP_FAILED. */
#define STEP_FAILED (-100)
#define LINK_CLOSED (-101)  /* the creditor's doorbell or region is gone: it died */
#define LINK_TIMEOUT (-102) /* no reply within timeout_ms */
#define LINK_DEAD (-103)    /* silent, and `alive` says it is gone */
#define LINK_BAD (-104)     /* a reply to another step or layer */
#define LINK_REFUSED (-105) /* the creditor answered with an error (its status in the reply) */

typedef void (*MergeFn)(float *, float *, const int64_t *, int64_t, int, int, const void *, int,
                       const float *);
typedef int (*AliveFn)(int64_t);
typedef int (*MAFn)(const MADecodeCall *);
typedef int (*StoreFn)(void *, void *, int64_t, const int64_t *, int64_t, const void *, int64_t,
                       const void *, int64_t, int, int, int);

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Byte offsets (data_plane.h's layout; Q = Hq*D, KV = Hkv*D floats a row): a request's q at
 * 64, then k, then v; a reply's out at 64, then lse. */
static int64_t request_k(int64_t n_rows, int64_t Q) { return 64 + ALIGN(n_rows * Q * 4); }
static int64_t request_v(int64_t n_rows, int64_t n_write, int64_t Q, int64_t KV) {
    return request_k(n_rows, Q) + ALIGN(n_write * KV * 4);
}
static int64_t reply_lse(int64_t n_rows, int64_t Q) { return 64 + ALIGN(n_rows * Q * 4); }

void native_sizes(int64_t n_rows, int64_t n_write, int64_t hq, int64_t hkv, int64_t d,
                  int64_t *out) {
    out[0] = request_v(n_rows, n_write, hq * d, hkv * d) + ALIGN(n_write * hkv * d * 4);
    out[1] = reply_lse(n_rows, hq * d) + ALIGN(n_rows * hq * 4);
}

static int ring(int fd) {
    const uint32_t bell = NATIVE_BELL;
    ssize_t n;
    do n = write(fd, &bell, sizeof bell);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof bell ? 0 : -1;
}

static void copy_rows(float *dst, const float *src, int64_t src_stride, const int64_t *rows,
                      int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * width, src + (rows ? rows[i] : i) * src_stride, width * sizeof(float));
}

static int send_layer(RemoteStep *s, int64_t layer, const float *qkv, int64_t *times) {
    const int64_t Q = s->hq * s->d, KV = s->hkv * s->d, QKV = Q + 2 * KV;
    RemoteLink *links = PTR(RemoteLink *, s->links);
    for (int64_t c = 0; c < s->num_links; c++) {
        const RemoteLink *l = &links[c];
        char *region = PTR(char *, l->out_region);
        RequestHead head = {s->step, layer};
        memcpy(region, &head, sizeof head);
        float *q = (float *)(region + 64);
        float *k = (float *)(region + request_k(l->n_rows, Q));
        float *v = (float *)(region + request_v(l->n_rows, l->n_write, Q, KV));
        copy_rows(q, qkv, QKV, PTR(const int64_t *, l->rows), l->n_rows, Q);
        copy_rows(k, qkv + Q, QKV, PTR(const int64_t *, l->write_rows), l->n_write, KV);
        copy_rows(v, qkv + Q + KV, QKV, PTR(const int64_t *, l->write_rows), l->n_write, KV);
        if (times) times[2 + 4 * c] = now_ns();
        s->pending = 1;
        if (ring(l->bell_out)) {
            s->failed = c;
            s->status = LINK_CLOSED;
            return STEP_FAILED;
        }
    }
    return 0;
}

/* The reply's doorbell on link c: 0, or the link's failure. */
static int await_reply(RemoteStep *s, int64_t c) {
    const RemoteLink *l = &PTR(RemoteLink *, s->links)[c];
    int64_t waited = 0;
    for (;;) {
        struct pollfd p = {(int)l->bell_in, POLLIN, 0};
        const int ready = poll(&p, 1, (int)s->slice_ms);
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0) return LINK_CLOSED;
        if (ready == 0) {
            waited += s->slice_ms;
            if (s->alive && !PTR(AliveFn, s->alive)(c)) return LINK_DEAD;
            if (waited >= s->timeout_ms) return LINK_TIMEOUT;
            continue;
        }
        uint32_t bell;
        const ssize_t n = read((int)l->bell_in, &bell, sizeof bell);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n != (ssize_t)sizeof bell) return LINK_CLOSED; /* 0: the writer closed (died) */
        return bell == NATIVE_BELL ? 0 : LINK_BAD;
    }
}

static int merge_layer(RemoteStep *s, int64_t layer, float *attn, float *lse, int64_t *times) {
    RemoteLink *links = PTR(RemoteLink *, s->links);
    const int64_t Q = s->hq * s->d;
    for (int64_t c = 0; c < s->num_links; c++) {
        const RemoteLink *l = &links[c];
        int status = await_reply(s, c);
        const char *region = PTR(const char *, l->in_region);
        ReplyHead head;
        if (!status) {
            memcpy(&head, region, sizeof head);
            if (head.step != s->step || head.layer != layer) status = LINK_BAD;
            else if (head.status) status = LINK_REFUSED;
        }
        if (status) {
            s->failed = c;
            s->status = status;
            return STEP_FAILED;
        }
        if (times) {
            int64_t *at = times + 2 + 4 * c;
            at[1] = now_ns();
            at[2] = head.began_ns;
            at[3] = head.ended_ns;
        }
        if (!l->n_rows) continue; /* a creditor that only stores */
        const float *out = (const float *)(region + 64);
        const float *part_lse = (const float *)(region + reply_lse(l->n_rows, Q));
        PTR(MergeFn, s->merge)(attn, lse, PTR(const int64_t *, l->rows), l->n_rows, (int)s->hq,
                               (int)s->d, out, 0, part_lse);
    }
    s->pending = 0;
    return 0;
}

int remote_step(void *ctx, int64_t phase, int64_t layer, const float *qkv, float *attn,
                float *lse) {
    RemoteStep *s = ctx;
    int64_t *times = NULL;
    if (s->times && layer >= 0 && layer < s->num_layers)
        times = PTR(int64_t *, s->times) + layer * (2 + 4 * s->num_links);
    if (times) times[phase ? 1 : 0] = now_ns();
    return phase == 0 ? send_layer(s, layer, qkv, times) : merge_layer(s, layer, attn, lse, times);
}

static int64_t reply(const ServeLink *l, int64_t status, int64_t layer, int64_t began) {
    ReplyHead head = {status, l->step, layer, began, now_ns()};
    if (l->times && layer >= 0 && layer < l->num_layers) {
        PTR(int64_t *, l->times)[2 * layer] = began;
        PTR(int64_t *, l->times)[2 * layer + 1] = head.ended_ns;
    }
    memcpy(PTR(char *, l->out_region), &head, sizeof head);
    return ring((int)l->bell_out) ? SERVE_CLOSED : SERVE_HANDLED;
}

int64_t serve_native(const void *link) {
    const ServeLink *l = link;
    uint32_t bell;
    ssize_t n;
    do n = read((int)l->bell_in, &bell, sizeof bell);
    while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? SERVE_NOTHING : SERVE_CLOSED;
    if (n != (ssize_t)sizeof bell) return SERVE_CLOSED;
    if (bell != NATIVE_BELL) return (int64_t)bell;
    const int64_t began = now_ns();
    if (l->delay_ns > 0) {
        struct timespec ts = {l->delay_ns / 1000000000, l->delay_ns % 1000000000};
        while (nanosleep(&ts, &ts) && errno == EINTR) {
        }
    }
    RequestHead head;
    const char *in = PTR(const char *, l->in_region);
    memcpy(&head, in, sizeof head);
    if (head.step != l->step || head.layer < 0 || head.layer >= l->num_layers)
        return reply(l, -7, head.layer, began); /* not the step set up: answered, refused */
    const int64_t Q = l->hq * l->d, KV = l->hkv * l->d;
    const float *q = (const float *)(in + 64);
    const float *k = (const float *)(in + request_k(l->n_rows, Q));
    const float *v = (const float *)(in + request_v(l->n_rows, l->n_write, Q, KV));
    const int64_t k_layer = l->k_base + head.layer * l->layer_stride;
    const int64_t v_layer = l->v_base + head.layer * l->layer_stride;
    int status;
    if (l->ma) {
        MADecodeCall *call = PTR(MADecodeCall *, l->call);
        char *reply_region = PTR(char *, l->out_region);
        call->q = (int64_t)(intptr_t)q;
        call->k = k_layer;
        call->v = v_layer;
        call->out = (int64_t)(intptr_t)(reply_region + 64);
        call->lse = (int64_t)(intptr_t)(reply_region + reply_lse(l->n_rows, Q));
        call->write_n = l->n_write;
        call->write_k = (int64_t)(intptr_t)k;
        call->write_k_row = KV;
        call->write_v = (int64_t)(intptr_t)v;
        call->write_v_row = KV;
        status = PTR(MAFn, l->ma)(call);
    } else {
        status = l->n_write ? PTR(StoreFn, l->store)(PTR(void *, k_layer), PTR(void *, v_layer),
                                                     l->head_stride,
                                                     PTR(const int64_t *, l->write_slots),
                                                     l->n_write, k, KV, v, KV, (int)l->hkv,
                                                     (int)l->d, 4)
                            : 0;
    }
    return reply(l, status, head.layer, began);
}
