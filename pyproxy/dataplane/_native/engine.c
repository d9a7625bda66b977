/* pyproxy._engine: the splice relay's connection engine, in C.
 *
 * The pure-Python twin is pyproxy/dataplane/splice.py (FastRelay); the wrapper that makes this
 * a TcpRelay is pyproxy/dataplane/engine.py (NativeRelay). Both follow the same rules
 * (splice.py's header is their theory of operation); this file only moves connections and
 * bytes. Every decision stays in Python and is asked for through callbacks:
 *
 *   decide(client_ip, client_port, dst_ip, dst_port) -> None | (ip, port, transparent, ctx[, plan])
 *       a new connection was accepted (dst: its original destination). None: reset it
 *       (the callback counted why). Else dial (ip, port), from the client's address when
 *       `transparent` is 1 (or True), from the node's when 0, and when 2 (model/source.py's
 *       Source.POD) from the client's if it is inside the pod networks last given to
 *       set_pod_networks() and is not the endpoint's own address, else from the node's;
 *       `ctx` is the caller's, handed back with every report on this pair.
 *       plan = (key, route, targets, counters): "until routes[key] is no longer `route`,
 *       serve this destination by a uniform draw from `targets` (tuples like this one,
 *       without the plan), without asking". `routes` is the dict given at construction.
 *       For such a pair the engine also does the counting decide() and closed() would do
 *       (counters.active, .total, .bytes_in, .bytes_out: see "Plans" below).
 *   redial(ctx, client_ip, client_port, dst_ip, dst_port, failed, errno, attempt) -> same
 *       a dial failed (errno 0: it timed out); `failed` lists the (ip, port) tried so far.
 *   closed(ctx, bytes_in, bytes_out)      the pair is gone: bytes not yet reported
 *   moved(ctx, bytes_in, bytes_out)       flush(): bytes of an open pair not yet reported
 *   note(stage, errno | exception)        something worth counting and logging went wrong
 *
 * The copy/splice policy of each direction is pyproxy/model/copymode.py's CopyPolicy, with its
 * three numbers given at construction; `policy()` below answers the same questions as the
 * model so a unit test can hold the two to the same table.
 *
 * Structure:
 * - One epoll set (fileno()) that the event loop watches as one fd, and run() drains: the
 *   listeners, a timerfd (dial deadlines, accept pauses), and both sockets of every pair,
 *   each registered once. A pair's sockets are edge-triggered (EPOLLET), so interest that
 *   cannot fire without cause stays: EPOLLOUT once a socket has needed it (its edge comes
 *   only after a send found the socket full; an upstream has it from the dial, for the
 *   connect), EPOLLIN after its direction's EOF (no level to spin on). Interest changes only
 *   when a direction stops reading because its destination is full, and starts again (that
 *   MOD re-checks the socket, so data that came meanwhile is reported). A read loop that
 *   stops at its round limit with data perhaps left re-arms the same way. A connection that
 *   carries a request and its reply so costs two epoll_ctl: one ADD per socket.
 * - A pair is a `Conn`: two directions (UP client->upstream, DOWN upstream->client), each in
 *   copy mode (one recv into the shared buffer, one send) or splice mode (its own pipe).
 * - A closed Conn is freed only when run() ends (a later event of the same batch may name
 *   it), into a free list that new pairs reuse.
 * - An event belongs to the socket it was reported for. A redial closes the upstream socket
 *   and registers a new one under the same Ref; an event of the old socket still waiting in
 *   the current batch (its connect completed as its deadline passed) is dropped then
 *   (forget_batched), so it never reaches the new socket.
 * - Plans: a destination whose endpoint choice depends on nothing but its endpoint set (no
 *   affinity, no client-dependent set: the caller decides that) is served from a plan
 *   decide() handed over, keyed by the destination's address, checked at each connection by
 *   one dict lookup: the route object that routes[key] holds now must be the plan's (a sync
 *   makes a new Route for every change, so a change is seen by the next connection). Then
 *   no Python code runs between accept and the first byte relayed, nor at close.
 * - Urgent data (MSG_OOB) is passed in band: every socket has SO_OOBINLINE (the listeners,
 *   so the accepted sockets inherit it; each upstream at its dial; each adopted socket), so the
 *   urgent byte is read and forwarded as an ordinary byte, in its place. A read still stops at
 *   the urgent mark, and a splice never steps over it (it answers EAGAIN there, or 0 once the
 *   FIN has come): only a recv does. So a source whose event says urgent data waits
 *   (EPOLLPRI, watched with EPOLLIN) takes the slow path: a splicing direction empties its
 *   pipe and goes back to copying, and a short copy read is not taken for "drained" (nor,
 *   with EPOLLRDHUP, for the end) while urgent data waits; a splice's 0 is an EOF only if the
 *   source is not at the mark (SIOCATMARK). The copy policy may splice again afterwards.
 * - Pipes: a direction that starts splicing gets a pipe of the kernel's default size
 *   (PIPE_BASE, 64 KiB: what a copying direction holds in its buffer too). Once a splice round
 *   filled it and its destination took it all (a bulk direction whose reader keeps up), it
 *   grows to pipe_size (1 MiB: about half the splices and wake-ups per GB) if the engine's
 *   pipe budget allows: at most pipe_budget bytes above PIPE_BASE in all pipes together. A
 *   pipe's bytes are kernel memory outside tcp_mem that a slow reader pins: so that is at most
 *   64 KiB per splicing direction plus pipe_budget per engine (one per worker process).
 * - Re-entrancy: a callback cannot call a method that changes the engine's state (enter()).
 * - SIGPIPE: the engine never depends on the process ignoring it (CPython does; a program
 *   that embeds the engine need not). Sends carry MSG_NOSIGNAL; a splice into a socket has no
 *   such flag, so the first one of each method call blocks SIGPIPE for the thread, and when
 *   the method ends a SIGPIPE its splices raised is taken (sigtimedwait) and the mask put back
 *   (sigpipe_hold, sigpipe_release: two syscalls per call that splices, none otherwise).
 * - Nothing blocks; the GIL is held throughout (every call is a non-blocking syscall).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#ifndef F_SETPIPE_SZ
#define F_SETPIPE_SZ 1031
#endif

#define BUFFER_SIZE (64 * 1024)
#define MAX_EVENTS 256
#define ACCEPT_BATCH 64
#define READ_ROUNDS 4   /* copy-mode reads per readable event */
#define SPLICE_ROUNDS 4 /* splice rounds per readable event */
#define MAX_LISTENERS 8
#define MAX_TIMEOUTS 16
#define ACCEPT_PAUSE 0.1 /* seconds without accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM */
#define SPLICE_NOW (-1)
#define FALLBACK_PIPE_SIZE (256 * 1024)
#define PIPE_BASE (64 * 1024)            /* a new pipe: the kernel's default (16 pages) */
#define DEFAULT_PIPE_BUDGET (32L << 20) /* bytes of pipe above PIPE_BASE, all pairs together */
#ifndef F_GETPIPE_SZ
#define F_GETPIPE_SZ 1032
#endif
#define EV_IN_RDHUP (EPOLLIN | EPOLLRDHUP | EPOLLPRI) /* PRI: urgent data (see "Urgent data") */
#define EV_DIAL (EV_IN_RDHUP | EPOLLOUT | EPOLLET) /* an upstream's interest from its dial on */
#define EV_ERR_HUP (EPOLLERR | EPOLLHUP)
#define PLAN_BUCKETS 4096
#define PLAN_LIMIT 16384 /* plans held at most: past it they are all dropped and made again */

enum { UP = 0, DOWN = 1 };                  /* directions */
enum { CLIENT = 0, UPSTREAM = 1 };          /* sockets of a pair */
enum { DIALING = 0, OPEN = 1, CLOSED = 2 }; /* pair states */
enum { REF_CLIENT = 0, REF_UPSTREAM = 1, REF_LISTENER = 2, REF_TIMER = 3 };

static char buffer[BUFFER_SIZE];

#define MAX_POD_NETWORKS 16
#define SOURCE_POD 2 /* model/source.py's Source.POD */

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} Addr;

struct Conn;

typedef struct {
    int kind;
    struct Conn *conn;
    int index; /* listeners: their slot */
} Ref;

typedef struct {
    char *pending; /* copy mode: bytes read, not yet written */
    size_t pending_len, pending_off;
    int pipe_r, pipe_w; /* splice mode: -1 when copying */
    size_t in_pipe;
    size_t pipe_cap;   /* the pipe's capacity: PIPE_BASE until it grows (see "Pipes") */
    long pipe_extra;   /* its bytes above PIPE_BASE, counted in the engine's pipe_grown */
    long streak, small;
    unsigned eof : 1, shut : 1, reading : 1, writing : 1, no_grow : 1;
    unsigned long long bytes, reported;
} Dir;

typedef struct Conn {
    Ref ref[2];
    int fd[2];
    int registered[2];
    uint32_t mask[2];
    int rearm[2]; /* a read stopped with data perhaps left: re-check the socket (MOD) */
    int state;
    int attempt;
    int transparent;
    int shared; /* adopted: another process may hold dups of its sockets (see conn_close) */
    Dir dir[2];
    Addr client, frontend, endpoint;
    double started, last, deadline;
    PyObject *ctx, *failed, *target; /* target: the (ip, port, ...) tuple being dialed */
    PyObject *counters;               /* served from a plan: the engine counts (else closed()) */
    struct Conn *prev, *next;         /* every live pair */
    struct Conn *dprev, *dnext;       /* the dial queue of its attempt */
    unsigned long long id;
} Conn;

typedef struct {
    Conn *head, *tail;
} Queue;

typedef struct {
    int fd;
    int paused;
    double resume_at;
    Ref ref;
} Listener;

/* How one destination is served without asking decide() (the header's "Plans"). */
typedef struct Plan {
    struct Plan *next; /* in its bucket */
    Addr frontend;
    PyObject *key, *route, *targets, *counters;
} Plan;

typedef struct {
    PyObject_HEAD int epfd, tfd;
    PyObject *decide, *redial, *closed_cb, *moved_cb, *note_cb;
    PyObject *routes; /* NULL: no plans */
    Plan *plans[PLAN_BUCKETS];
    int nplans;
    uint64_t rng;
    double timeouts[MAX_TIMEOUTS];
    int ntimeouts;
    long splice_after, bulk_read, copy_after;
    int pipe_size;   /* what a pipe may grow to */
    long pipe_budget; /* bytes of pipe above PIPE_BASE the engine may hold, all pairs together */
    long pipe_grown;  /* bytes of pipe above PIPE_BASE it holds now */
    int draining;
    Conn *all;
    Py_ssize_t count;
    Queue dialing[MAX_TIMEOUTS];
    Conn *zombies, *spare;
    Py_ssize_t nspare;
    Listener listeners[MAX_LISTENERS];
    int nlisteners;
    Ref timer_ref;
    double armed; /* the timerfd's deadline, 0: none */
    double now;
    int in_run;
    int busy; /* a state-changing method runs (enter()) */
    int sigpipe_held, epipe; /* SIGPIPE blocked by sigpipe_hold; a splice met EPIPE meanwhile */
    sigset_t mask_before;     /* the thread's signal mask before sigpipe_hold */
    struct epoll_event *batch; /* run(): the events of this batch, those from batch_next on still to come */
    int batch_next, batch_end;
    unsigned long long next_id;
    int npods; /* set_pod_networks(): the pods whose address a Source.POD dial keeps */
    struct {
        int family;
        unsigned char addr[16];
        int plen;
    } pods[MAX_POD_NETWORKS];
} Engine;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- re-entrancy ---- */

/* The engine calls Python in the middle of its own work (decide, redial, closed, moved, note,
 * and whatever a counter's attribute or the garbage collector runs). A method that changes
 * the engine's state, called from there, would run on half-done bookkeeping: the pairs of a
 * batch freed under it, the epoll set closed mid-batch, a sweep's next pair released. So
 * every such method (run, sweep, flush, close_all, close_pair, detach, adopt, close,
 * add_listener, remove_listener) runs inside enter(), and one called while another runs
 * raises RuntimeError. Reading methods (fileno, count, connections, ids) and set_draining
 * (a flag) may be called from a callback. */
static int enter(Engine *e, const char *method) {
    if (e->busy) {
        PyErr_Format(PyExc_RuntimeError, "Engine.%s() called from within one of the engine's own callbacks",
                     method);
        return -1;
    }
    e->busy = 1;
    return 0;
}

/* ---- the copy policy: pyproxy/model/copymode.py's CopyPolicy ---- */

static long copy_read(Engine *e, long streak, long n) {
    if (e->splice_after < 0 || n < e->bulk_read)
        return 0;
    streak += n;
    return streak >= e->splice_after ? SPLICE_NOW : streak;
}

static long splice_round(Engine *e, long small, long n) {
    if (e->splice_after == 0 || n >= e->bulk_read)
        return 0;
    return small + 1;
}

/* ---- callbacks into Python ---- */

/* A callback is NULL only after the garbage collector broke a cycle through the engine
 * (Engine_clear): the engine is unreachable then and about to go, so a NULL one is skipped. */

static void note_errno(Engine *e, const char *stage, int err) {
    if (e->note_cb == NULL)
        return;
    PyObject *r = PyObject_CallFunction(e->note_cb, "si", stage, err);
    if (r == NULL)
        PyErr_WriteUnraisable(e->note_cb);
    Py_XDECREF(r);
}

/* The exception set now is reported to note(stage, exception), then cleared. */
static void note_exception(Engine *e, const char *stage) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (e->note_cb != NULL) {
        PyObject *r = PyObject_CallFunction(e->note_cb, "sO", stage, value ? value : Py_None);
        if (r == NULL)
            PyErr_WriteUnraisable(e->note_cb);
        Py_XDECREF(r);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* An address as text: IPv4 by hand (glibc's inet_ntop formats it with sprintf, a sixth of
 * a connection's instructions), IPv6 by inet_ntop. */
static PyObject *addr_ip(const Addr *a) {
    char text[INET6_ADDRSTRLEN];
    if (a->sa.sa_family == AF_INET) {
        const unsigned char *b = (const unsigned char *)&a->v4.sin_addr;
        char *p = text;
        for (int i = 0; i < 4; i++) {
            unsigned v = b[i];
            if (v >= 100)
                *p++ = (char)('0' + v / 100);
            if (v >= 10)
                *p++ = (char)('0' + v / 10 % 10);
            *p++ = (char)('0' + v % 10);
            *p++ = i < 3 ? '.' : '\0';
        }
        return PyUnicode_FromStringAndSize(text, p - text - 1);
    }
    if (inet_ntop(AF_INET6, &a->v6.sin6_addr, text, sizeof text) == NULL)
        text[0] = '\0';
    return PyUnicode_FromString(text);
}

static int addr_port(const Addr *a) {
    return ntohs(a->sa.sa_family == AF_INET6 ? a->v6.sin6_port : a->v4.sin_port);
}

static PyObject *addr_tuple(const Addr *a) {
    PyObject *ip = addr_ip(a);
    if (ip == NULL)
        return NULL;
    return Py_BuildValue("(Ni)", ip, addr_port(a));
}

static int parse_addr(PyObject *ip, int port, Addr *out) {
    const char *text = PyUnicode_AsUTF8(ip);
    if (text == NULL)
        return -1;
    memset(out, 0, sizeof *out);
    if (strchr(text, ':') != NULL) {
        out->v6.sin6_family = AF_INET6;
        out->v6.sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, text, &out->v6.sin6_addr) == 1)
            return 0;
    } else {
        out->v4.sin_family = AF_INET;
        out->v4.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, text, &out->v4.sin_addr) == 1)
            return 0;
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %R", ip);
    return -1;
}

static socklen_t addr_len(const Addr *a) {
    return a->sa.sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

/* ---- plans: destinations served without asking decide() ---- */

static PyObject *str_active, *str_total, *str_bytes_in, *str_bytes_out;

static int addr_same(const Addr *a, const Addr *b) {
    if (a->sa.sa_family != b->sa.sa_family)
        return 0;
    if (a->sa.sa_family == AF_INET)
        return a->v4.sin_port == b->v4.sin_port && a->v4.sin_addr.s_addr == b->v4.sin_addr.s_addr;
    return a->v6.sin6_port == b->v6.sin6_port &&
           memcmp(&a->v6.sin6_addr, &b->v6.sin6_addr, sizeof a->v6.sin6_addr) == 0;
}

static unsigned addr_bucket(const Addr *a) {
    uint64_t h;
    if (a->sa.sa_family == AF_INET) {
        h = ((uint64_t)a->v4.sin_addr.s_addr << 16) ^ a->v4.sin_port;
    } else {
        uint64_t w[2];
        memcpy(w, &a->v6.sin6_addr, sizeof w);
        h = w[0] ^ (w[1] * 31) ^ a->v6.sin6_port;
    }
    h *= 0x9E3779B97F4A7C15ull;
    return (unsigned)(h >> 32) % PLAN_BUCKETS;
}

static Plan **plan_slot(Engine *e, const Addr *frontend) {
    Plan **slot = &e->plans[addr_bucket(frontend)];
    while (*slot != NULL && !addr_same(&(*slot)->frontend, frontend))
        slot = &(*slot)->next;
    return slot;
}

static void plan_free(Plan *p) {
    Py_XDECREF(p->key);
    Py_XDECREF(p->route);
    Py_XDECREF(p->targets);
    Py_XDECREF(p->counters);
    PyMem_RawFree(p);
}

static void plans_clear(Engine *e) {
    for (int i = 0; i < PLAN_BUCKETS; i++) {
        while (e->plans[i] != NULL) {
            Plan *p = e->plans[i];
            e->plans[i] = p->next;
            plan_free(p);
        }
    }
    e->nplans = 0;
}

/* The plan for `frontend` while it still holds (its route is still routes[key]), else NULL
 * (a plan that no longer holds is dropped). */
static Plan *plan_find(Engine *e, const Addr *frontend) {
    if (e->routes == NULL || e->nplans == 0)
        return NULL;
    Plan **slot = plan_slot(e, frontend);
    Plan *p = *slot;
    if (p == NULL)
        return NULL;
    PyObject *now = PyDict_GetItemWithError(e->routes, p->key); /* borrowed */
    if (now == p->route)
        return p;
    PyErr_Clear();
    *slot = p->next;
    e->nplans--;
    plan_free(p);
    return NULL;
}

/* Keep decide()'s plan (key, route, targets, counters) for `frontend`. A plan that is not
 * that shape is an error of the caller's: reported, and the destination is asked again. */
static void plan_keep(Engine *e, const Addr *frontend, PyObject *plan) {
    if (e->routes == NULL || plan == Py_None)
        return;
    if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != 4 || !PyTuple_Check(PyTuple_GET_ITEM(plan, 2)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 2)) < 1) {
        PyErr_Format(PyExc_TypeError, "a plan is (key, route, targets, counters) with targets, not %R", plan);
        note_exception(e, "internal");
        return;
    }
    PyObject *targets = PyTuple_GET_ITEM(plan, 2);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(targets); i++) {
        PyObject *t = PyTuple_GET_ITEM(targets, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
            PyErr_Format(PyExc_TypeError, "a plan's targets are (ip, port, transparent, ctx), not %R", t);
            note_exception(e, "internal");
            return;
        }
    }
    Plan **slot = plan_slot(e, frontend);
    if (*slot != NULL) { /* replaced */
        Plan *old = *slot;
        *slot = old->next;
        e->nplans--;
        plan_free(old);
    }
    if (e->nplans >= PLAN_LIMIT) {
        plans_clear(e);
        slot = plan_slot(e, frontend);
    }
    Plan *p = PyMem_RawMalloc(sizeof *p);
    if (p == NULL)
        return; /* asked again next time */
    p->frontend = *frontend;
    p->key = Py_NewRef(PyTuple_GET_ITEM(plan, 0));
    p->route = Py_NewRef(PyTuple_GET_ITEM(plan, 1));
    p->targets = Py_NewRef(targets);
    p->counters = Py_NewRef(PyTuple_GET_ITEM(plan, 3));
    p->next = NULL;
    *slot = p;
    e->nplans++;
}

/* xorshift64*: a uniform index below n (the bias of the multiply-shift is below 2^-32 * n). */
static Py_ssize_t draw(Engine *e, Py_ssize_t n) {
    uint64_t x = e->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    e->rng = x;
    uint32_t r = (uint32_t)((x * 0x2545F4914F6CDD1Dull) >> 32);
    return (Py_ssize_t)(((uint64_t)r * (uint64_t)n) >> 32);
}

/* counters.<name> += delta (a plan's pair is counted as decide() and closed() count). */
static int count(PyObject *counters, PyObject *name, unsigned long long delta, int negative) {
    if (delta == 0)
        return 0;
    PyObject *value = PyObject_GetAttr(counters, name);
    if (value == NULL)
        return -1;
    PyObject *d = PyLong_FromUnsignedLongLong(delta);
    PyObject *sum = d == NULL ? NULL : negative ? PyNumber_Subtract(value, d) : PyNumber_Add(value, d);
    Py_DECREF(value);
    Py_XDECREF(d);
    if (sum == NULL)
        return -1;
    int rc = PyObject_SetAttr(counters, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* ---- bookkeeping ---- */

static void queue_remove(Engine *e, Conn *c) {
    if (c->deadline == 0)
        return;
    Queue *q = &e->dialing[c->attempt - 1];
    if (c->dprev)
        c->dprev->dnext = c->dnext;
    else
        q->head = c->dnext;
    if (c->dnext)
        c->dnext->dprev = c->dprev;
    else
        q->tail = c->dprev;
    c->dprev = c->dnext = NULL;
    c->deadline = 0;
}

static void arm(Engine *e, double when) {
    if (e->armed != 0 && e->armed <= when)
        return;
    struct itimerspec spec;
    memset(&spec, 0, sizeof spec);
    spec.it_value.tv_sec = (time_t)when;
    spec.it_value.tv_nsec = (long)((when - (double)(time_t)when) * 1e9);
    if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0)
        spec.it_value.tv_nsec = 1;
    if (timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &spec, NULL) == 0)
        e->armed = when;
}

static void queue_push(Engine *e, Conn *c, double timeout) {
    Queue *q = &e->dialing[c->attempt - 1];
    c->deadline = e->now + timeout;
    c->dnext = NULL;
    c->dprev = q->tail;
    if (q->tail)
        q->tail->dnext = c;
    else
        q->head = c;
    q->tail = c;
    arm(e, c->deadline);
}

static void dir_init(Dir *d) {
    memset(d, 0, sizeof *d);
    d->pipe_r = d->pipe_w = -1;
}

static Conn *conn_new(Engine *e) {
    Conn *c = e->spare;
    if (c != NULL) {
        e->spare = c->next;
        e->nspare--;
    } else {
        c = PyMem_RawMalloc(sizeof *c);
        if (c == NULL)
            return NULL;
    }
    memset(c, 0, sizeof *c);
    c->fd[CLIENT] = c->fd[UPSTREAM] = -1;
    for (int i = 0; i < 2; i++) {
        c->ref[i].kind = i == 0 ? REF_CLIENT : REF_UPSTREAM;
        c->ref[i].conn = c;
        dir_init(&c->dir[i]);
    }
    c->id = ++e->next_id;
    c->started = c->last = e->now;
    c->next = e->all;
    if (e->all)
        e->all->prev = c;
    e->all = c;
    e->count++;
    return c;
}

static void conn_release(Engine *e, Conn *c) {
    if (e->nspare < 1024) {
        c->next = e->spare;
        e->spare = c;
        e->nspare++;
    } else {
        PyMem_RawFree(c);
    }
}

static void reset_close(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* Close d's pipe, its growth given back to the budget. */
static void pipe_close(Engine *e, Dir *d) {
    close(d->pipe_r);
    close(d->pipe_w);
    d->pipe_r = d->pipe_w = -1;
    e->pipe_grown -= d->pipe_extra;
    d->pipe_extra = 0;
}

static void dir_stop(Engine *e, Dir *d) {
    d->reading = d->writing = 0;
    if (d->pipe_r >= 0)
        pipe_close(e, d);
    if (d->pending) {
        PyMem_RawFree(d->pending);
        d->pending = NULL;
    }
}

/* The bytes each direction moved since they were last reported, marked reported. */
static void take_unreported(Conn *c, unsigned long long *in, unsigned long long *out) {
    *in = c->dir[UP].bytes - c->dir[UP].reported;
    *out = c->dir[DOWN].bytes - c->dir[DOWN].reported;
    c->dir[UP].reported = c->dir[UP].bytes;
    c->dir[DOWN].reported = c->dir[DOWN].bytes;
}

/* A plan's pair is gone: what closed() would count, counted here. */
static void count_closed(Engine *e, Conn *c) {
    unsigned long long in, out;
    take_unreported(c, &in, &out);
    if (count(c->counters, str_active, 1, 1) < 0 || count(c->counters, str_bytes_in, in, 0) < 0 ||
        count(c->counters, str_bytes_out, out, 0) < 0)
        PyErr_WriteUnraisable(c->counters);
}

static void report(Engine *e, Conn *c, PyObject *cb) {
    if (cb == NULL)
        return;
    unsigned long long in, out;
    take_unreported(c, &in, &out);
    PyObject *n_in = PyLong_FromUnsignedLongLong(in), *n_out = PyLong_FromUnsignedLongLong(out);
    PyObject *r = NULL;
    if (n_in != NULL && n_out != NULL) {
        PyObject *argv[3] = {c->ctx, n_in, n_out};
        r = PyObject_Vectorcall(cb, argv, 3, NULL);
    }
    Py_XDECREF(n_in);
    Py_XDECREF(n_out);
    if (r == NULL)
        PyErr_WriteUnraisable(cb);
    Py_XDECREF(r);
}

/* End the pair: pipes and buffers released, sockets closed (abort: with a reset), the
 * caller told (closed(ctx, bytes not yet reported)). After detach() the kernel sockets live
 * on in the dups handed away, so closing ours here sends nothing. An adopted pair's sockets
 * may live on in the predecessor's dups (until it hears "done", or for good after a refused
 * hand-over), and closing an fd takes it out of the epoll set only with the last reference to
 * the socket: so its registrations are deleted first, or a stale event would reach whatever
 * pair reuses this struct (or freed memory). */
static void conn_close(Engine *e, Conn *c, int abort) {
    if (c->state == CLOSED)
        return;
    queue_remove(e, c);
    if (c->shared)
        for (int i = 0; i < 2; i++)
            if (c->registered[i] && c->fd[i] >= 0) {
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[i], NULL);
                c->registered[i] = 0;
            }
    for (int i = 0; i < 2; i++)
        dir_stop(e, &c->dir[i]);
    for (int i = 1; i >= 0; i--) {
        if (c->fd[i] >= 0) {
            if (abort)
                reset_close(c->fd[i]);
            else
                close(c->fd[i]);
            c->fd[i] = -1;
        }
    }
    c->state = CLOSED;
    if (c->prev)
        c->prev->next = c->next;
    else
        e->all = c->next;
    if (c->next)
        c->next->prev = c->prev;
    e->count--;
    if (c->ctx != NULL) {
        if (c->counters != NULL)
            count_closed(e, c);
        else
            report(e, c, e->closed_cb);
        Py_CLEAR(c->ctx);
    }
    Py_CLEAR(c->counters);
    Py_CLEAR(c->failed);
    Py_CLEAR(c->target);
    if (e->in_run) {
        c->next = e->zombies;
        e->zombies = c;
    } else {
        conn_release(e, c);
    }
}

static void conn_fail(Engine *e, Conn *c, int err) {
    note_errno(e, "relay", err);
    conn_close(e, c, 0);
}

/* A direction waiting for its destination to drain: its source is not watched meanwhile. */
static int paused(Dir *d) {
    return !d->reading && !d->eof;
}

/* Bring both sockets' epoll interest in line with what the directions want (edge-triggered:
 * see the header for what stays). */
static void sync_interest(Engine *e, Conn *c) {
    if (c->state != OPEN)
        return;
    Dir *up = &c->dir[UP], *down = &c->dir[DOWN];
    uint32_t want[2];
    want[CLIENT] = EPOLLET | (c->registered[CLIENT] ? c->mask[CLIENT] & EPOLLOUT : 0) |
                   (paused(up) ? 0 : EV_IN_RDHUP) | (down->writing ? EPOLLOUT : 0);
    want[UPSTREAM] = EPOLLET | (c->registered[UPSTREAM] ? c->mask[UPSTREAM] & EPOLLOUT : 0) |
                     (paused(down) ? 0 : EV_IN_RDHUP) | (up->writing ? EPOLLOUT : 0);
    for (int i = 0; i < 2; i++) {
        if (c->registered[i] && c->mask[i] == want[i] && !c->rearm[i])
            continue;
        c->rearm[i] = 0;
        struct epoll_event ev = {.events = want[i], .data.ptr = &c->ref[i]};
        int op = c->registered[i] ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if (epoll_ctl(e->epfd, op, c->fd[i], &ev) < 0) {
            conn_fail(e, c, errno);
            return;
        }
        c->registered[i] = 1;
        c->mask[i] = want[i];
    }
}

/* ---- moving bytes ---- */

static int other_shut(Conn *c, Dir *d) {
    return c->dir[d == &c->dir[UP] ? DOWN : UP].shut;
}

static int src_fd(Conn *c, Dir *d) {
    return d == &c->dir[UP] ? c->fd[CLIENT] : c->fd[UPSTREAM];
}

static int dst_fd(Conn *c, Dir *d) {
    return d == &c->dir[UP] ? c->fd[UPSTREAM] : c->fd[CLIENT];
}

static void dir_shut(Engine *e, Conn *c, Dir *d) {
    if (d->shut)
        return;
    d->shut = 1;
    if (other_shut(c, d)) {
        /* Both directions are done: close() sends this FIN (both receive queues were read
         * to their EOF, so it is a FIN, not a reset). */
        conn_close(e, c, 0);
        return;
    }
    if (shutdown(dst_fd(c, d), SHUT_WR) < 0 && errno != ENOTCONN)
        conn_fail(e, c, errno);
}

static void dir_ended(Engine *e, Conn *c, Dir *d) {
    d->eof = 1;
    d->reading = 0;
    if (d->pending == NULL && d->in_pipe == 0)
        dir_shut(e, c, d);
}

/* Write buf[*sent:len] to fd until it is all written or fd is full; advances *sent.
 * 0, or the errno of a failed send. */
static int send_until_full(int fd, const char *buf, size_t len, size_t *sent) {
    while (*sent < len) {
        ssize_t k = send(fd, buf + *sent, len - *sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return errno;
        }
        *sent += (size_t)k;
    }
    return 0;
}

static void wait_for_dst(Dir *d) {
    d->reading = 0;
    d->writing = 1;
}

static void to_splice(Engine *e, Dir *d) {
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return; /* out of fds: keep copying (the next bulk streak tries again) */
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    d->pipe_cap = PIPE_BASE; /* grown by grow_pipe (the header's "Pipes") */
    d->pipe_extra = 0;
    d->no_grow = 0;
    d->small = 0;
}

/* A round filled d's pipe and the destination took it all: grow it to pipe_size, else to
 * 256 KiB (past the user's pipe-user-pages-soft an unprivileged process is refused big pipes),
 * while the engine's pipe budget allows; tried once per pipe. */
static void grow_pipe(Engine *e, Dir *d) {
    d->no_grow = 1;
    long sizes[2] = {e->pipe_size, FALLBACK_PIPE_SIZE};
    for (int i = 0; i < 2; i++) {
        long extra = sizes[i] - PIPE_BASE;
        if (sizes[i] <= (long)d->pipe_cap || e->pipe_grown + extra > e->pipe_budget)
            continue;
        int got = fcntl(d->pipe_w, F_SETPIPE_SZ, (int)sizes[i]);
        if (got > (int)d->pipe_cap) {
            d->pipe_cap = (size_t)got;
            d->pipe_extra = got - PIPE_BASE;
            e->pipe_grown += d->pipe_extra;
            return;
        }
    }
}

static void to_copy(Engine *e, Dir *d) {
    pipe_close(e, d);
    d->streak = 0;
}

/* Before a splice into a socket (it raises SIGPIPE on EPIPE: see the header). */
static void sigpipe_hold(Engine *e) {
    if (e->sigpipe_held)
        return;
    sigset_t pipe_only;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    if (pthread_sigmask(SIG_BLOCK, &pipe_only, &e->mask_before) == 0)
        e->sigpipe_held = 1;
}

/* At the end of each state-changing method (enter()): take the SIGPIPE our splices raised
 * (only if it was not blocked before: a SIGPIPE pending then is not ours), restore the mask. */
static void sigpipe_release(Engine *e) {
    if (!e->sigpipe_held)
        return;
    if (e->epipe && !sigismember(&e->mask_before, SIGPIPE)) {
        sigset_t pipe_only;
        sigemptyset(&pipe_only);
        sigaddset(&pipe_only, SIGPIPE);
        struct timespec now = {0, 0};
        sigtimedwait(&pipe_only, NULL, &now); /* one pending at most: SIGPIPE does not queue */
    }
    e->epipe = 0;
    e->sigpipe_held = 0;
    pthread_sigmask(SIG_SETMASK, &e->mask_before, NULL);
}

/* Move what the pipe holds to dst. -1: the pair failed (and is closed). */
static int flush_pipe(Engine *e, Conn *c, Dir *d) {
    int dst = dst_fd(c, d);
    if (d->in_pipe)
        sigpipe_hold(e);
    while (d->in_pipe) {
        ssize_t n = splice(d->pipe_r, NULL, dst, NULL, d->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            if (errno == EPIPE)
                e->epipe = 1;
            conn_fail(e, c, errno);
            return -1;
        }
        d->in_pipe -= (size_t)n;
    }
    return 0;
}

/* The read of d stopped with data perhaps left on its source: have sync_interest re-check it
 * (edge-triggered, no new edge would come for bytes already there). */
static void rearm_src(Conn *c, Dir *d) {
    c->rearm[d == &c->dir[UP] ? CLIENT : UPSTREAM] = 1;
}

/* Whether the next byte to read from fd is the urgent byte (a splice stops in front of it). */
static int at_urgent_mark(int fd) {
    int mark = 0;
    return ioctl(fd, SIOCATMARK, &mark) == 0 && mark;
}

static void dir_readable(Engine *e, Conn *c, Dir *d, uint32_t bits);

static void splice_in(Engine *e, Conn *c, Dir *d) {
    int src = src_fd(c, d);
    int i;
    for (i = 0; i < SPLICE_ROUNDS; i++) {
        ssize_t n = splice(src, NULL, d->pipe_w, NULL, (size_t)e->pipe_size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            conn_fail(e, c, errno);
            return;
        }
        if (n == 0) {
            if (at_urgent_mark(src)) { /* not the EOF: a splice stops there; copy over it */
                to_copy(e, d);
                dir_readable(e, c, d, EPOLLPRI);
                return;
            }
            dir_ended(e, c, d);
            return;
        }
        d->in_pipe += (size_t)n;
        d->bytes += (unsigned long long)n;
        c->last = e->now;
        if (flush_pipe(e, c, d) < 0)
            return;
        if (d->in_pipe) {
            wait_for_dst(d);
            return;
        }
        if ((size_t)n >= d->pipe_cap && !d->no_grow)
            grow_pipe(e, d);
        d->small = splice_round(e, d->small, n);
        if (d->small >= e->copy_after) {
            to_copy(e, d);
            rearm_src(c, d);
            break;
        }
    }
    if (i == SPLICE_ROUNDS)
        rearm_src(c, d);
    d->reading = 1;
}

/* Move what src has. A read shorter than the buffer drained the socket. If the event said
 * the peer's FIN had come (EPOLLRDHUP, without an error or hang-up), that read also reached
 * the FIN: every byte before a FIN is queued before it is, so the direction has ended, and
 * no read is spent on seeing the EOF. */
static void dir_readable(Engine *e, Conn *c, Dir *d, uint32_t bits) {
    if (d->pipe_r >= 0) {
        if (!(bits & EPOLLPRI)) {
            splice_in(e, c, d);
            return;
        }
        /* urgent data waits: empty the pipe, then copy (the header's "Urgent data") */
        if (flush_pipe(e, c, d) < 0)
            return;
        if (d->in_pipe) { /* resumed by a MOD, which reports EPOLLPRI again */
            wait_for_dst(d);
            return;
        }
        to_copy(e, d);
    }
    int src = src_fd(c, d), dst = dst_fd(c, d);
    int i;
    for (i = 0; i < READ_ROUNDS; i++) {
        ssize_t n = recv(src, buffer, BUFFER_SIZE, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                break;
            conn_fail(e, c, errno);
            return;
        }
        if (n == 0) {
            dir_ended(e, c, d);
            return;
        }
        d->bytes += (unsigned long long)n;
        c->last = e->now;
        size_t sent = 0;
        int err = send_until_full(dst, buffer, (size_t)n, &sent);
        if (err) {
            conn_fail(e, c, err);
            return;
        }
        if (sent < (size_t)n) { /* dst is full: keep the rest, wait for it to drain */
            d->pending = PyMem_RawMalloc((size_t)(n - sent));
            if (d->pending == NULL) {
                conn_fail(e, c, ENOMEM);
                return;
            }
            memcpy(d->pending, buffer + sent, (size_t)(n - sent));
            d->pending_len = (size_t)(n - sent);
            d->pending_off = 0;
            d->streak = 0;
            wait_for_dst(d);
            return;
        }
        if (n >= e->bulk_read || d->streak) {
            long streak = copy_read(e, d->streak, n);
            if (streak == SPLICE_NOW) {
                d->streak = 0;
                to_splice(e, d);
                rearm_src(c, d);
                break;
            }
            d->streak = streak;
        }
        if (n < BUFFER_SIZE && !(bits & EPOLLPRI)) { /* with urgent data, a read stops at its mark */
            if ((bits & (EPOLLRDHUP | EV_ERR_HUP)) == EPOLLRDHUP) {
                dir_ended(e, c, d);
                return;
            }
            if (!(bits & EPOLLRDHUP))
                break;
        }
    }
    if (i == READ_ROUNDS)
        rearm_src(c, d);
    d->reading = 1;
}

static void dir_writable(Engine *e, Conn *c, Dir *d) {
    if (d->pipe_r >= 0 && d->in_pipe) {
        if (flush_pipe(e, c, d) < 0 || d->in_pipe)
            return;
    } else if (d->pending != NULL) {
        int err = send_until_full(dst_fd(c, d), d->pending, d->pending_len, &d->pending_off);
        if (err) {
            conn_fail(e, c, err);
            return;
        }
        if (d->pending_off < d->pending_len)
            return;
        PyMem_RawFree(d->pending);
        d->pending = NULL;
    }
    d->writing = 0;
    if (d->eof)
        dir_shut(e, c, d);
    else
        d->reading = 1;
}

/* ---- dialing ---- */

static void conn_connected(Engine *e, Conn *c, uint32_t bits);
static void dial_failed(Engine *e, Conn *c, int err);

static void refuse(Engine *e, Conn *c) {
    conn_close(e, c, 1);
}

/* Whether `a` lies in the first `plen` bits of `net` (both `len` bytes long). */
static int prefix_match(const unsigned char *a, const unsigned char *net, int plen) {
    int whole = plen / 8, rest = plen % 8;
    if (memcmp(a, net, (size_t)whole) != 0)
        return 0;
    return rest == 0 || ((a[whole] ^ net[whole]) & (unsigned char)(0xff << (8 - rest))) == 0;
}

/* Source.POD: the client is a pod of this node (inside a network of set_pod_networks) and
 * not the endpoint itself (hairpin keeps the node's address). */
static int keeps_pod_source(const Engine *e, const Addr *client, const Addr *endpoint) {
    const unsigned char *a;
    int family = client->sa.sa_family;
    if (family == AF_INET6) {
        a = client->v6.sin6_addr.s6_addr;
        if (endpoint->sa.sa_family == AF_INET6 && memcmp(a, endpoint->v6.sin6_addr.s6_addr, 16) == 0)
            return 0;
    } else if (family == AF_INET) {
        a = (const unsigned char *)&client->v4.sin_addr.s_addr;
        if (endpoint->sa.sa_family == AF_INET && client->v4.sin_addr.s_addr == endpoint->v4.sin_addr.s_addr)
            return 0;
    } else {
        return 0;
    }
    for (int i = 0; i < e->npods; i++)
        if (e->pods[i].family == family && prefix_match(a, e->pods[i].addr, e->pods[i].plen))
            return 1;
    return 0;
}

/* Dial what `target` (ip, port, transparent, ctx) names: attempt c->attempt + 1, at most
 * ntimeouts (dial_failed refuses a redial past the last attempt, whatever redial() answers:
 * the attempt indexes the dial queues, so the bound is the engine's, not its caller's). */
static void dial(Engine *e, Conn *c, PyObject *target) {
    PyObject *ip = PyTuple_GET_ITEM(target, 0);
    int port = (int)PyLong_AsLong(PyTuple_GET_ITEM(target, 1));
    long mode = PyLong_AsLong(PyTuple_GET_ITEM(target, 2));
    if (PyErr_Occurred() || mode < 0 || mode > SOURCE_POD || parse_addr(ip, port, &c->endpoint) < 0) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "a target's source mode is 0, 1 or 2, not %ld", mode);
        note_exception(e, "internal");
        refuse(e, c);
        return;
    }
    int transparent = mode == SOURCE_POD ? keeps_pod_source(e, &c->client, &c->endpoint) : mode != 0;
    Py_XSETREF(c->target, Py_NewRef(target));
    c->transparent = transparent;
    c->attempt++;
    int family = c->endpoint.sa.sa_family;
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { /* out of file descriptors, say: not the endpoint's fault */
        note_errno(e, "upstream", errno);
        refuse(e, c);
        return;
    }
    int one = 1;
    if (family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one); /* urgent data in band */
    if (transparent) {
        Addr source = c->client;
        int ok;
        if (family == AF_INET6) {
            source.v6.sin6_port = 0;
            ok = setsockopt(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof one) == 0;
        } else {
            source.v4.sin_port = 0;
            ok = setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof one) == 0;
        }
        ok = ok && setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) == 0;
        ok = ok && source.sa.sa_family == family && bind(fd, &source.sa, addr_len(&source)) == 0;
        if (!ok) {
            int err = source.sa.sa_family == family ? errno : EAFNOSUPPORT;
            close(fd);
            note_errno(e, "upstream", err);
            refuse(e, c);
            return;
        }
    }
    c->fd[UPSTREAM] = fd;
    c->registered[UPSTREAM] = 0;
    if (connect(fd, &c->endpoint.sa, addr_len(&c->endpoint)) == 0) {
        conn_connected(e, c, 0); /* not registered yet: its ADD reports what is there */
        return;
    }
    if (errno != EINPROGRESS) {
        dial_failed(e, c, errno);
        return;
    }
    struct epoll_event ev = {.events = EV_DIAL, .data.ptr = &c->ref[UPSTREAM]};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        note_errno(e, "upstream", errno);
        refuse(e, c);
        return;
    }
    c->registered[UPSTREAM] = 1;
    c->mask[UPSTREAM] = EV_DIAL;
    int slot = c->attempt - 1 < e->ntimeouts ? c->attempt - 1 : e->ntimeouts - 1;
    queue_push(e, c, e->timeouts[slot]);
    if (c->attempt >= 2 && !c->registered[CLIENT]) {
        /* A slow endpoint: watch the client for errors and hang-ups meanwhile, so a client
         * that gives up ends the attempt too (the first attempt is short enough unwatched). */
        struct epoll_event cev = {.events = EPOLLET, .data.ptr = &c->ref[CLIENT]};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, c->fd[CLIENT], &cev) == 0) {
            c->registered[CLIENT] = 1;
            c->mask[CLIENT] = EPOLLET;
        }
    }
}

/* `ref`'s socket is closed and `ref` may name another from now on: its events still waiting
 * in this batch are dropped. */
static void forget_batched(Engine *e, Ref *ref) {
    if (!e->in_run)
        return;
    for (int i = e->batch_next; i < e->batch_end; i++)
        if (e->batch[i].data.ptr == ref)
            e->batch[i].data.ptr = NULL;
}

static void dial_failed(Engine *e, Conn *c, int err) {
    queue_remove(e, c);
    forget_batched(e, &c->ref[UPSTREAM]);
    if (c->fd[UPSTREAM] >= 0) {
        close(c->fd[UPSTREAM]);
        c->fd[UPSTREAM] = -1;
        c->registered[UPSTREAM] = 0;
    }
    if (c->failed == NULL && (c->failed = PyList_New(0)) == NULL) {
        note_exception(e, "internal");
        refuse(e, c);
        return;
    }
    PyObject *tried = PyTuple_GetSlice(c->target, 0, 2);
    if (tried == NULL || PyList_Append(c->failed, tried) < 0) {
        Py_XDECREF(tried);
        note_exception(e, "internal");
        refuse(e, c);
        return;
    }
    Py_DECREF(tried);
    PyObject *cip = addr_ip(&c->client), *dip = addr_ip(&c->frontend);
    PyObject *next = NULL;
    if (e->redial == NULL)
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
    else if (cip != NULL && dip != NULL)
        next = PyObject_CallFunction(e->redial, "OOiOiOii", c->ctx, cip, addr_port(&c->client), dip,
                                     addr_port(&c->frontend), c->failed, err, c->attempt);
    Py_XDECREF(cip);
    Py_XDECREF(dip);
    if (next == NULL) {
        note_exception(e, "internal");
        refuse(e, c);
        return;
    }
    if (next == Py_None || !PyTuple_Check(next) || PyTuple_GET_SIZE(next) < 3) {
        Py_DECREF(next);
        refuse(e, c);
        return;
    }
    if (c->attempt >= e->ntimeouts) { /* the last attempt failed: the engine's own bound */
        Py_DECREF(next);
        PyErr_Format(PyExc_RuntimeError, "redial() answered an endpoint after the last of %d dial attempts",
                     e->ntimeouts);
        note_exception(e, "internal");
        refuse(e, c);
        return;
    }
    dial(e, c, next);
    Py_DECREF(next);
}

/* bits: the connect's event; edge-triggered, so a reply that came with it is read now. */
static void conn_connected(Engine *e, Conn *c, uint32_t bits) {
    queue_remove(e, c);
    c->state = OPEN;
    if (e->splice_after == 0) {
        to_splice(e, &c->dir[UP]);
        to_splice(e, &c->dir[DOWN]);
    }
    c->dir[DOWN].reading = 1;
    /* the client's request is usually there already: no wait for a wake-up */
    dir_readable(e, c, &c->dir[UP], 0);
    if (c->state == OPEN && bits & EV_IN_RDHUP)
        dir_readable(e, c, &c->dir[DOWN], bits);
    if (c->state == OPEN)
        sync_interest(e, c);
}

static void dial_done(Engine *e, Conn *c, uint32_t bits) {
    if (!(bits & (EPOLLOUT | EV_ERR_HUP)))
        return;
    if (bits & EV_ERR_HUP) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd[UPSTREAM], SOL_SOCKET, SO_ERROR, &err, &len);
        dial_failed(e, c, err ? err : ECONNREFUSED);
        return;
    }
    conn_connected(e, c, bits);
}

/* ---- accepting ---- */

static Conn *conn_accepted(Engine *e, int fd, const Addr *client, const Addr *local, PyObject *ctx) {
    Conn *c = conn_new(e);
    if (c == NULL) {
        note_errno(e, "upstream", ENOMEM);
        reset_close(fd);
        return NULL;
    }
    c->fd[CLIENT] = fd;
    c->client = *client;
    c->frontend = *local;
    c->ctx = Py_NewRef(ctx);
    return c;
}

/* Serve from a plan: counted as decide() counts (active, total), drawn, dialed. */
static void serve_planned(Engine *e, int fd, const Addr *client, const Addr *local, Plan *p) {
    PyObject *target = PyTuple_GET_ITEM(p->targets, draw(e, PyTuple_GET_SIZE(p->targets)));
    if (count(p->counters, str_active, 1, 0) < 0 || count(p->counters, str_total, 1, 0) < 0) {
        note_exception(e, "internal");
        reset_close(fd);
        return;
    }
    Conn *c = conn_accepted(e, fd, client, local, PyTuple_GET_ITEM(target, 3));
    if (c == NULL) {
        count(p->counters, str_active, 1, 1);
        PyErr_Clear();
        return;
    }
    c->counters = Py_NewRef(p->counters);
    dial(e, c, target);
}

static void serve(Engine *e, int fd, Addr *client) {
    Addr local;
    socklen_t len = sizeof local;
    if (getsockname(fd, &local.sa, &len) < 0) {
        note_errno(e, "client", errno);
        close(fd);
        return;
    }
    Plan *plan = plan_find(e, &local);
    if (plan != NULL) {
        serve_planned(e, fd, client, &local, plan);
        return;
    }
    PyObject *cip = addr_ip(client), *dip = addr_ip(&local);
    PyObject *cport = PyLong_FromLong(addr_port(client)), *dport = PyLong_FromLong(addr_port(&local));
    PyObject *target = NULL;
    if (e->decide == NULL) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
    } else if (cip != NULL && dip != NULL && cport != NULL && dport != NULL) {
        PyObject *argv[4] = {cip, cport, dip, dport};
        target = PyObject_Vectorcall(e->decide, argv, 4, NULL);
    }
    Py_XDECREF(cip);
    Py_XDECREF(dip);
    Py_XDECREF(cport);
    Py_XDECREF(dport);
    if (target == NULL) {
        note_exception(e, "internal");
        reset_close(fd);
        return;
    }
    if (target == Py_None) {
        Py_DECREF(target);
        reset_close(fd);
        return;
    }
    Py_ssize_t size = PyTuple_Check(target) ? PyTuple_GET_SIZE(target) : 0;
    if (size != 4 && size != 5) {
        PyErr_Format(PyExc_TypeError, "decide() must return None or (ip, port, transparent, ctx[, plan]), not %R",
                     target);
        Py_DECREF(target);
        note_exception(e, "internal");
        reset_close(fd);
        return;
    }
    if (size == 5)
        plan_keep(e, &local, PyTuple_GET_ITEM(target, 4));
    Conn *c = conn_accepted(e, fd, client, &local, PyTuple_GET_ITEM(target, 3));
    if (c != NULL)
        dial(e, c, target);
    Py_DECREF(target);
}

static void pause_listener(Engine *e, Listener *l) {
    struct epoll_event ev = {.events = 0, .data.ptr = &l->ref};
    epoll_ctl(e->epfd, EPOLL_CTL_MOD, l->fd, &ev);
    l->paused = 1;
    l->resume_at = e->now + ACCEPT_PAUSE;
    arm(e, l->resume_at);
}

static void accept_batch(Engine *e, Listener *l) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        Addr client;
        socklen_t len = sizeof client;
        int fd = accept4(l->fd, &client.sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return;
            if (errno == ECONNABORTED || errno == EPROTO)
                continue;
            note_errno(e, "accept", errno); /* EMFILE, ENFILE, ENOBUFS: leave the rest queued */
            pause_listener(e, l);
            return;
        }
        if (e->draining) {
            reset_close(fd);
            continue;
        }
        serve(e, fd, &client);
    }
}

/* ---- the timer: dial deadlines and paused listeners ---- */

static int client_gone(Conn *c) {
    struct pollfd p = {.fd = c->fd[CLIENT], .events = 0};
    return poll(&p, 1, 0) == 1 && p.revents & (POLLERR | POLLHUP);
}

static void on_timer(Engine *e) {
    uint64_t ticks;
    if (read(e->tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
        return;
    e->armed = 0;
    for (int q = 0; q < e->ntimeouts; q++) {
        /* each queue is in deadline order: one timeout per attempt */
        for (int bound = 0; bound < 1 << 20; bound++) {
            Conn *c = e->dialing[q].head;
            if (c == NULL || c->deadline > e->now)
                break;
            if (client_gone(c)) { /* it reset while we dialed (the first attempt is unwatched) */
                note_errno(e, "client-dial", ECONNRESET);
                conn_close(e, c, 1);
                continue;
            }
            dial_failed(e, c, 0);
        }
    }
    double next = 0;
    for (int q = 0; q < e->ntimeouts; q++) {
        Conn *c = e->dialing[q].head;
        if (c != NULL && (next == 0 || c->deadline < next))
            next = c->deadline;
    }
    for (int i = 0; i < e->nlisteners; i++) {
        Listener *l = &e->listeners[i];
        if (l->fd < 0 || !l->paused)
            continue;
        if (l->resume_at <= e->now) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &l->ref};
            epoll_ctl(e->epfd, EPOLL_CTL_MOD, l->fd, &ev);
            l->paused = 0;
        } else if (next == 0 || l->resume_at < next) {
            next = l->resume_at;
        }
    }
    if (next != 0)
        arm(e, next);
}

/* ---- events ---- */

static void on_conn_event(Engine *e, Conn *c, int side, uint32_t bits) {
    if (c->state == CLOSED)
        return;
    if (c->state == DIALING) {
        if (side == UPSTREAM) {
            dial_done(e, c, bits);
        } else if (bits & EV_ERR_HUP) {
            note_errno(e, "client-dial", ECONNRESET);
            conn_close(e, c, 1);
        }
        return;
    }
    Dir *reader = &c->dir[side == CLIENT ? UP : DOWN];
    Dir *writer = &c->dir[side == CLIENT ? DOWN : UP];
    if (!reader->reading && !writer->writing) {
        /* an error on a socket nobody waits on fails the pair; anything else (a hang-up, the
         * readiness of a paused or ended direction) is an edge, reported once: ignored */
        if (bits & EPOLLERR)
            conn_fail(e, c, ECONNRESET);
        return;
    }
    if (reader->reading && bits & (EV_IN_RDHUP | EV_ERR_HUP))
        dir_readable(e, c, reader, bits);
    if (c->state == OPEN && writer->writing && bits & (EPOLLOUT | EV_ERR_HUP))
        dir_writable(e, c, writer);
    if (c->state == OPEN)
        sync_interest(e, c);
}

static int check_open(Engine *e);

static PyObject *run_body(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    /* run() handles what is ready now (the event loop's reader callback); run(ms) first waits
     * up to ms for something, with the GIL released (for a loop of its own: bench.relayrig). */
    int timeout = 0;
    if (nargs > 1 || (nargs == 1 && ((timeout = (int)PyLong_AsLong(args[0])) == -1 && PyErr_Occurred()))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "run([timeout_ms])");
        return NULL;
    }
    if (check_open(e) < 0)
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    int n;
    if (timeout == 0) {
        n = epoll_wait(e->epfd, events, MAX_EVENTS, 0);
    } else {
        /* the wait is no work of the engine's: another thread may call it meanwhile (a sweep,
         * bench.relayrig --engine-thread), so enter()'s guard is lifted until it ends */
        int epfd = e->epfd;
        e->busy = 0;
        Py_BEGIN_ALLOW_THREADS n = epoll_wait(epfd, events, MAX_EVENTS, timeout);
        Py_END_ALLOW_THREADS
        e->busy = 1;
        if (e->epfd != epfd) {
            PyErr_SetString(PyExc_ValueError, "the engine was closed while run() waited");
            return NULL;
        }
    }
    if (n < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->now = monotonic();
    e->in_run = 1;
    e->batch = events;
    e->batch_end = n;
    for (int i = 0; i < n; i++) {
        Ref *ref = events[i].data.ptr;
        e->batch_next = i + 1;
        if (ref == NULL) /* forget_batched */
            continue;
        switch (ref->kind) {
        case REF_CLIENT:
            on_conn_event(e, ref->conn, CLIENT, events[i].events);
            break;
        case REF_UPSTREAM:
            on_conn_event(e, ref->conn, UPSTREAM, events[i].events);
            break;
        case REF_LISTENER:
            if (e->listeners[ref->index].fd >= 0 && !e->listeners[ref->index].paused)
                accept_batch(e, &e->listeners[ref->index]);
            break;
        case REF_TIMER:
            on_timer(e);
            break;
        }
    }
    e->in_run = 0;
    e->batch = NULL;
    e->batch_end = 0;
    while (e->zombies) {
        Conn *c = e->zombies;
        e->zombies = c->next;
        conn_release(e, c);
    }
    Py_RETURN_NONE;
}

/* ---- the Python face ---- */

static int Engine_init(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"decide",      "redial",       "closed",    "moved",     "note",
                             "dial_timeouts", "splice_after", "bulk_read", "copy_after", "pipe_size",
                             "routes",      "pipe_budget",  NULL};
    PyObject *decide, *redial, *closed, *moved, *note, *timeouts, *routes = Py_None;
    long splice_after, bulk_read, copy_after, pipe_budget = DEFAULT_PIPE_BUDGET;
    int pipe_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOllli|Ol", kwlist, &decide, &redial, &closed, &moved, &note,
                                     &timeouts, &splice_after, &bulk_read, &copy_after, &pipe_size, &routes,
                                     &pipe_budget))
        return -1;
    if (routes != Py_None && !PyDict_Check(routes)) {
        PyErr_SetString(PyExc_TypeError, "routes must be a dict or None");
        return -1;
    }
    PyObject *seq = PySequence_Fast(timeouts, "dial_timeouts must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    if (k < 1 || k > MAX_TIMEOUTS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "dial_timeouts: 1 to %d timeouts, not %zd", MAX_TIMEOUTS, k);
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        e->timeouts[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    if (bulk_read <= 0 || copy_after <= 0 || pipe_size <= 0 || pipe_budget < 0) {
        PyErr_SetString(PyExc_ValueError, "bulk_read, copy_after and pipe_size must be positive, pipe_budget not negative");
        return -1;
    }
    if (e->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    e->ntimeouts = (int)k;
    e->splice_after = splice_after;
    e->bulk_read = bulk_read;
    e->copy_after = copy_after;
    e->pipe_size = pipe_size;
    e->pipe_budget = pipe_budget;
    Py_XSETREF(e->decide, Py_NewRef(decide));
    Py_XSETREF(e->redial, Py_NewRef(redial));
    Py_XSETREF(e->closed_cb, Py_NewRef(closed));
    Py_XSETREF(e->moved_cb, Py_NewRef(moved));
    Py_XSETREF(e->note_cb, Py_NewRef(note));
    Py_XSETREF(e->routes, routes == Py_None ? NULL : Py_NewRef(routes));
    if (getrandom(&e->rng, sizeof e->rng, GRND_NONBLOCK) != sizeof e->rng)
        e->rng = (uint64_t)(monotonic() * 1e9) ^ (uint64_t)getpid() << 32;
    e->rng |= 1; /* xorshift never leaves 0, so it must not start there */
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (e->tfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->timer_ref.kind = REF_TIMER;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &e->timer_ref};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->tfd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->now = monotonic();
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e != NULL)
        e->epfd = e->tfd = -1;
    return (PyObject *)e;
}

static void close_all(Engine *e, int abort) {
    for (Py_ssize_t bound = e->count + 1; e->all != NULL && bound > 0; bound--)
        conn_close(e, e->all, abort);
}

/* The garbage collector's view: the callbacks (bound methods of the relay, which holds the
 * engine: a cycle) and what each live pair holds (its context, the endpoints it tried, the
 * dial target). */
static int Engine_traverse(Engine *e, visitproc visit, void *arg) {
    Py_VISIT(e->decide);
    Py_VISIT(e->redial);
    Py_VISIT(e->closed_cb);
    Py_VISIT(e->moved_cb);
    Py_VISIT(e->note_cb);
    Py_VISIT(e->routes);
    for (int i = 0; i < PLAN_BUCKETS; i++) {
        for (Plan *p = e->plans[i]; p != NULL; p = p->next) {
            Py_VISIT(p->key);
            Py_VISIT(p->route);
            Py_VISIT(p->targets);
            Py_VISIT(p->counters);
        }
    }
    for (Conn *c = e->all; c != NULL; c = c->next) {
        Py_VISIT(c->ctx);
        Py_VISIT(c->failed);
        Py_VISIT(c->target);
        Py_VISIT(c->counters);
    }
    return 0;
}

/* Break the cycle: drop the callbacks and plans (the pairs are ended, unreported, at dealloc). */
static int Engine_clear(Engine *e) {
    plans_clear(e);
    Py_CLEAR(e->routes);
    Py_CLEAR(e->decide);
    Py_CLEAR(e->redial);
    Py_CLEAR(e->closed_cb);
    Py_CLEAR(e->moved_cb);
    Py_CLEAR(e->note_cb);
    return 0;
}

static void Engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    close_all(e, 1);
    while (e->spare) {
        Conn *c = e->spare;
        e->spare = c->next;
        PyMem_RawFree(c);
    }
    if (e->tfd >= 0)
        close(e->tfd);
    if (e->epfd >= 0)
        close(e->epfd);
    Engine_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int check_open(Engine *e) {
    if (e->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return -1;
    }
    return 0;
}

static PyObject *Engine_fileno(Engine *e, PyObject *unused) {
    if (check_open(e) < 0)
        return NULL;
    return PyLong_FromLong(e->epfd);
}

static PyObject *add_listener_body(Engine *e, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (PyErr_Occurred() || check_open(e) < 0)
        return NULL;
    int slot = -1;
    for (int i = 0; i < e->nlisteners; i++)
        if (e->listeners[i].fd < 0)
            slot = i;
    if (slot < 0) {
        if (e->nlisteners == MAX_LISTENERS) {
            PyErr_SetString(PyExc_ValueError, "too many listeners");
            return NULL;
        }
        slot = e->nlisteners++;
    }
    Listener *l = &e->listeners[slot];
    int one = 1; /* urgent data in band: the accepted sockets inherit it */
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
    l->fd = fd;
    l->paused = 0;
    l->ref.kind = REF_LISTENER;
    l->ref.index = slot;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &l->ref};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        l->fd = -1;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *remove_listener_body(Engine *e, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (PyErr_Occurred())
        return NULL;
    for (int i = 0; i < e->nlisteners; i++) {
        if (e->listeners[i].fd == fd) {
            if (e->epfd >= 0)
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
            e->listeners[i].fd = -1;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *sweep_body(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sweep(idle_timeout, half_close_timeout)");
        return NULL;
    }
    double idle = PyFloat_AsDouble(args[0]), half = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred())
        return NULL;
    e->now = monotonic();
    long closed = 0;
    Conn *c = e->all;
    for (Py_ssize_t bound = e->count + 1; c != NULL && bound > 0; bound--) {
        Conn *next = c->next;
        if (c->state == OPEN) {
            double limit = c->dir[UP].eof || c->dir[DOWN].eof ? half : idle;
            if (e->now - c->last >= limit) {
                conn_close(e, c, 1);
                closed++;
            }
        }
        c = next;
    }
    return PyLong_FromLong(closed);
}

static PyObject *flush_body(Engine *e, PyObject *unused) {
    for (Conn *c = e->all; c != NULL; c = c->next)
        if (c->dir[UP].bytes != c->dir[UP].reported || c->dir[DOWN].bytes != c->dir[DOWN].reported)
            report(e, c, e->moved_cb);
    Py_RETURN_NONE;
}

static PyObject *close_all_body(Engine *e, PyObject *arg) {
    int abort = PyObject_IsTrue(arg);
    if (abort < 0)
        return NULL;
    close_all(e, abort);
    Py_RETURN_NONE;
}

static PyObject *close_pair_body(Engine *e, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "close_pair(id, abort)");
        return NULL;
    }
    unsigned long long id = PyLong_AsUnsignedLongLong(args[0]);
    int abort = PyObject_IsTrue(args[1]);
    if (PyErr_Occurred())
        return NULL;
    for (Conn *c = e->all; c != NULL; c = c->next)
        if (c->id == id) {
            conn_close(e, c, abort);
            break;
        }
    Py_RETURN_NONE;
}

/* set_pod_networks(((family 4|6, network bytes, prefix length), ...)): Source.POD's pods. */
static PyObject *Engine_set_pod_networks(Engine *e, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "set_pod_networks() takes a sequence of (family, bytes, prefixlen)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_POD_NETWORKS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %d pod networks, not %zd", MAX_POD_NETWORKS, n);
    }
    int count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int version, plen;
        const char *bytes;
        Py_ssize_t len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iy#i", &version, &bytes, &len, &plen)) {
            Py_DECREF(seq);
            return NULL;
        }
        Py_ssize_t want = version == 6 ? 16 : 4;
        if ((version != 4 && version != 6) || len != want || plen < 0 || plen > want * 8) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "pod network %zd: (%d, %zd bytes, /%d) is not a network", i,
                                version, len, plen);
        }
        count++;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* all valid: take them at once */
        int version, plen;
        const char *bytes;
        Py_ssize_t len;
        PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iy#i", &version, &bytes, &len, &plen);
        e->pods[i].family = version == 6 ? AF_INET6 : AF_INET;
        memset(e->pods[i].addr, 0, sizeof e->pods[i].addr);
        memcpy(e->pods[i].addr, bytes, (size_t)len);
        e->pods[i].plen = plen;
    }
    e->npods = count;
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_draining(Engine *e, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    e->draining = on;
    Py_RETURN_NONE;
}

static PyObject *dir_state(Dir *d) {
    PyObject *held = d->pending ? PyBytes_FromStringAndSize(d->pending + d->pending_off,
                                                            (Py_ssize_t)(d->pending_len - d->pending_off))
                                : PyBytes_FromStringAndSize(NULL, 0);
    if (held == NULL)
        return NULL;
    return Py_BuildValue("(OONOn)", d->eof ? Py_True : Py_False, d->shut ? Py_True : Py_False, held,
                         d->pipe_r >= 0 ? Py_True : Py_False, (Py_ssize_t)d->in_pipe);
}

/* (id, ctx, client, frontend, endpoint | None, bytes_in, bytes_out, started, last, up_eof, down_eof) */
static PyObject *conn_info(Conn *c) {
    PyObject *client = addr_tuple(&c->client), *frontend = addr_tuple(&c->frontend);
    PyObject *endpoint = c->state == OPEN ? addr_tuple(&c->endpoint) : Py_NewRef(Py_None);
    if (client == NULL || frontend == NULL || endpoint == NULL) {
        Py_XDECREF(client);
        Py_XDECREF(frontend);
        Py_XDECREF(endpoint);
        return NULL;
    }
    return Py_BuildValue("(KONNNKKddOO)", c->id, c->ctx, client, frontend, endpoint, c->dir[UP].bytes,
                         c->dir[DOWN].bytes, c->started, c->last, c->dir[UP].eof ? Py_True : Py_False,
                         c->dir[DOWN].eof ? Py_True : Py_False);
}

/* A list of one item per live pair, made by `item` (which returns a new reference or NULL). */
static PyObject *each_pair(Engine *e, PyObject *(*item)(Conn *)) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Conn *c = e->all; c != NULL; c = c->next) {
        PyObject *one = item(c);
        if (one == NULL || PyList_Append(out, one) < 0) {
            Py_XDECREF(one);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(one);
    }
    return out;
}

/* Close every fd a list of fd numbers holds (dups made for a hand-out that did not happen). */
static void close_listed(PyObject *fds) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd >= 0)
            close((int)fd);
    }
}

static PyObject *conn_id(Conn *c) {
    return PyLong_FromUnsignedLongLong(c->id);
}

static PyObject *Engine_connections(Engine *e, PyObject *unused) {
    return each_pair(e, conn_info);
}

static PyObject *Engine_ids(Engine *e, PyObject *unused) {
    return each_pair(e, conn_id);
}

/* One established pair's hand-out item (info, up_state, down_state, [fds]) with dups of its
 * sockets and pipes (client, upstream, then each direction's pipe read and write ends, up
 * first), or NULL with an exception set and no dup left open. The pair is not touched. */
static PyObject *detach_item(Conn *c) {
    int owned[6], n = 0;
    owned[n++] = c->fd[CLIENT];
    owned[n++] = c->fd[UPSTREAM];
    for (int i = 0; i < 2; i++)
        if (c->dir[i].pipe_r >= 0) {
            owned[n++] = c->dir[i].pipe_r;
            owned[n++] = c->dir[i].pipe_w;
        }
    PyObject *fds = PyList_New(0);
    int ok = fds != NULL;
    for (int i = 0; ok && i < n; i++) {
        int dup_fd = fcntl(owned[i], F_DUPFD_CLOEXEC, 0);
        PyObject *num = dup_fd < 0 ? NULL : PyLong_FromLong(dup_fd);
        if (dup_fd < 0)
            PyErr_SetFromErrno(PyExc_OSError);
        if (num == NULL || PyList_Append(fds, num) < 0) {
            if (dup_fd >= 0)
                close(dup_fd);
            ok = 0;
        }
        Py_XDECREF(num);
    }
    PyObject *info = ok ? conn_info(c) : NULL;
    PyObject *up = info ? dir_state(&c->dir[UP]) : NULL;
    PyObject *down = up ? dir_state(&c->dir[DOWN]) : NULL;
    PyObject *item = down ? PyTuple_Pack(4, info, up, down, fds) : NULL;
    Py_XDECREF(info);
    Py_XDECREF(up);
    Py_XDECREF(down);
    if (item == NULL && fds != NULL)
        close_listed(fds);
    Py_XDECREF(fds);
    return item;
}

/* Every established pair leaves: [(info, up_state, down_state, [fds])] (detach_item). All or
 * nothing: the dups of every pair are made first, and if any fails (EMFILE, say) those made
 * are closed and every pair stays as it was, relayed here; only then do the pairs end here,
 * without a FIN or reset (the kernel objects live on in the dups), which cannot fail. */
static PyObject *detach_body(Engine *e, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    e->now = monotonic();
    Conn *c = e->all;
    for (Py_ssize_t bound = e->count + 1; c != NULL && bound > 0; bound--, c = c->next) {
        if (c->state != OPEN)
            continue;
        PyObject *item = detach_item(c);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(out); i++)
                close_listed(PyTuple_GET_ITEM(PyList_GET_ITEM(out, i), 3));
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    c = e->all;
    for (Py_ssize_t bound = e->count + 1; c != NULL && bound > 0; bound--) {
        Conn *next = c->next;
        if (c->state == OPEN) {
            for (int i = 0; i < 2; i++) /* out of the epoll set: closing our fd would not take it out */
                if (c->registered[i])
                    epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd[i], NULL);
            conn_close(e, c, 0);
        }
        c = next;
    }
    return out;
}

static int restore_dir(Engine *e, Dir *d, PyObject *state, int pipe_r, int pipe_w) {
    /* state: (eof, shut, held: bytes, pipe: bool, in_pipe: int) */
    int eof = PyObject_IsTrue(PyTuple_GET_ITEM(state, 0));
    int shut = PyObject_IsTrue(PyTuple_GET_ITEM(state, 1));
    PyObject *held = PyTuple_GET_ITEM(state, 2);
    Py_ssize_t in_pipe = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 4));
    if (eof < 0 || shut < 0 || !PyBytes_Check(held) || in_pipe < 0 || PyErr_Occurred()) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad direction state");
        return -1;
    }
    d->eof = eof;
    d->shut = shut;
    Py_ssize_t len = PyBytes_GET_SIZE(held);
    if (len > 0) {
        d->pending = PyMem_RawMalloc((size_t)len);
        if (d->pending == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(d->pending, PyBytes_AS_STRING(held), (size_t)len);
        d->pending_len = (size_t)len;
    }
    d->pipe_r = pipe_r;
    d->pipe_w = pipe_w;
    d->in_pipe = pipe_r >= 0 ? (size_t)in_pipe : 0;
    if (pipe_w >= 0) { /* a moved pipe counts as it is (it may have grown in the predecessor) */
        int cap = fcntl(pipe_w, F_GETPIPE_SZ);
        d->pipe_cap = cap > 0 ? (size_t)cap : PIPE_BASE;
        d->pipe_extra = cap > PIPE_BASE ? cap - PIPE_BASE : 0;
        d->no_grow = d->pipe_extra > 0;
        e->pipe_grown += d->pipe_extra;
    }
    return 0;
}

/* adopt()'s failure before the fds were sorted out: close every fd number the list `fds`
 * (args[1]) holds, sockets (the first two) with a reset; the exception set stays. NULL. */
static PyObject *close_given(PyObject *args) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *fds = PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 1 ? PyTuple_GET_ITEM(args, 1) : NULL;
    if (fds != NULL && PyList_Check(fds)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++) {
            long fd = PyLong_Check(PyList_GET_ITEM(fds, i)) ? PyLong_AsLong(PyList_GET_ITEM(fds, i)) : -1;
            PyErr_Clear();
            if (fd >= 0 && fd <= INT32_MAX) {
                if (i < 2)
                    reset_close((int)fd);
                else
                    close((int)fd);
            }
        }
    }
    PyErr_Restore(type, value, tb);
    return NULL;
}

/* adopt(ctx, fds, client, frontend, endpoint, age, idle, bytes_in, bytes_out, up, down):
 * go on relaying a pair another process detached. The engine owns `fds` from the call on: on
 * every failure they are closed (sockets with a reset), so the caller never closes them. */
static PyObject *adopt_body(Engine *e, PyObject *args) {
    /* the fds are the engine's from the call on: closed (sockets reset) on any failure */
    PyObject *ctx, *fds, *client, *frontend, *endpoint, *up, *down;
    double age, idle;
    unsigned long long bin, bout;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!ddKKO!O!", &ctx, &PyList_Type, &fds, &PyTuple_Type, &client,
                          &PyTuple_Type, &frontend, &PyTuple_Type, &endpoint, &age, &idle, &bin, &bout,
                          &PyTuple_Type, &up, &PyTuple_Type, &down))
        return close_given(args);
    if (PyTuple_GET_SIZE(up) != 5 || PyTuple_GET_SIZE(down) != 5) {
        PyErr_SetString(PyExc_ValueError, "direction states are 5-tuples");
        return close_given(args);
    }
    int up_pipe = PyObject_IsTrue(PyTuple_GET_ITEM(up, 3)), down_pipe = PyObject_IsTrue(PyTuple_GET_ITEM(down, 3));
    Py_ssize_t nfds = PyList_GET_SIZE(fds);
    if (up_pipe < 0 || down_pipe < 0 || nfds != 2 + 2 * up_pipe + 2 * down_pipe) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "fd count does not match the pipes");
        return close_given(args);
    }
    int fd[6];
    for (Py_ssize_t i = 0; i < nfds; i++) {
        fd[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (PyErr_Occurred())
            return close_given(args);
    }
    Addr a_client, a_frontend, a_endpoint;
    Conn *c = NULL;
    if (PyTuple_GET_SIZE(client) != 2 || PyTuple_GET_SIZE(frontend) != 2 || PyTuple_GET_SIZE(endpoint) != 2) {
        PyErr_SetString(PyExc_ValueError, "addresses are (ip, port)");
    } else if (parse_addr(PyTuple_GET_ITEM(client, 0), (int)PyLong_AsLong(PyTuple_GET_ITEM(client, 1)), &a_client) < 0 ||
               parse_addr(PyTuple_GET_ITEM(frontend, 0), (int)PyLong_AsLong(PyTuple_GET_ITEM(frontend, 1)),
                          &a_frontend) < 0 ||
               parse_addr(PyTuple_GET_ITEM(endpoint, 0), (int)PyLong_AsLong(PyTuple_GET_ITEM(endpoint, 1)),
                          &a_endpoint) < 0) {
    } else if (check_open(e) == 0) {
        e->now = monotonic();
        c = conn_new(e);
        if (c == NULL)
            PyErr_NoMemory();
    }
    if (c == NULL) {
        for (Py_ssize_t i = 0; i < nfds; i++)
            if (i < 2)
                reset_close(fd[i]);
            else
                close(fd[i]);
        return NULL;
    }
    c->fd[CLIENT] = fd[0];
    c->fd[UPSTREAM] = fd[1];
    for (int i = 0; i < 2; i++) { /* urgent data in band (a predecessor may not have set it) */
        int one = 1;
        setsockopt(fd[i], SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
    }
    c->shared = 1;
    c->client = a_client;
    c->frontend = a_frontend;
    c->endpoint = a_endpoint;
    c->started = e->now - age;
    c->last = e->now - idle;
    c->ctx = Py_NewRef(ctx);
    c->state = OPEN;
    c->dir[UP].bytes = c->dir[UP].reported = bin;
    c->dir[DOWN].bytes = c->dir[DOWN].reported = bout;
    int next = 2;
    int up_r = up_pipe ? fd[next] : -1, up_w = up_pipe ? fd[next + 1] : -1;
    next += 2 * up_pipe;
    int down_r = down_pipe ? fd[next] : -1, down_w = down_pipe ? fd[next + 1] : -1;
    if (restore_dir(e, &c->dir[UP], up, up_r, up_w) < 0 || restore_dir(e, &c->dir[DOWN], down, down_r, down_w) < 0) {
        if (c->dir[UP].pipe_r < 0 && up_r >= 0) { /* not taken up by its direction: close it here */
            close(up_r);
            close(up_w);
        }
        if (c->dir[DOWN].pipe_r < 0 && down_r >= 0) {
            close(down_r);
            close(down_w);
        }
        Py_CLEAR(c->ctx); /* the caller counts this failure: no closed() report */
        conn_close(e, c, 1);
        return NULL;
    }
    /* go on where the old process stopped: write what is held, forward an EOF, or read */
    for (int i = 0; i < 2 && c->state == OPEN; i++) {
        Dir *d = &c->dir[i];
        if (d->pending != NULL || d->in_pipe)
            wait_for_dst(d);
        else if (d->eof)
            dir_shut(e, c, d);
        else
            d->reading = 1;
    }
    sync_interest(e, c);
    Py_RETURN_NONE;
}

static PyObject *close_body(Engine *e, PyObject *unused) {
    close_all(e, 1);
    plans_clear(e);
    if (e->tfd >= 0)
        close(e->tfd);
    if (e->epfd >= 0)
        close(e->epfd);
    e->tfd = e->epfd = -1;
    e->nlisteners = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_get_pipe_grown(Engine *e, void *unused) {
    return PyLong_FromLong(e->pipe_grown);
}

static PyObject *Engine_get_count(Engine *e, void *unused) {
    return PyLong_FromSsize_t(e->count);
}

/* The methods that change the engine's state, each inside enter() (see "Re-entrancy") and
 * giving back the SIGPIPE mask after (see "SIGPIPE"); `NAME_body` does the work. */
static PyObject *leave(Engine *e, PyObject *result) {
    sigpipe_release(e);
    e->busy = 0;
    return result;
}

#define GUARDED_FASTCALL(NAME)                                                               \
    static PyObject *Engine_##NAME(Engine *e, PyObject *const *args, Py_ssize_t nargs) {     \
        if (enter(e, #NAME) < 0)                                                             \
            return NULL;                                                                     \
        return leave(e, NAME##_body(e, args, nargs));                                        \
    }
#define GUARDED(NAME)                                                                        \
    static PyObject *Engine_##NAME(Engine *e, PyObject *arg) {                               \
        if (enter(e, #NAME) < 0)                                                             \
            return NULL;                                                                     \
        return leave(e, NAME##_body(e, arg));                                                \
    }

GUARDED_FASTCALL(run)
GUARDED_FASTCALL(sweep)
GUARDED_FASTCALL(close_pair)
GUARDED(flush)
GUARDED(detach)
GUARDED(close)
GUARDED(close_all)
GUARDED(add_listener)
GUARDED(remove_listener)

static PyObject *Engine_adopt(Engine *e, PyObject *args) {
    if (enter(e, "adopt") < 0)
        return close_given(args); /* its fds are the engine's from the call on */
    return leave(e, adopt_body(e, args));
}

static PyMethodDef engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "the epoll fd the event loop watches"},
    {"run", (PyCFunction)(void (*)(void))Engine_run, METH_FASTCALL,
     "run([timeout_ms]): handle every ready event (the loop's reader callback), waiting first if asked"},
    {"add_listener", (PyCFunction)Engine_add_listener, METH_O, "accept on this listening fd"},
    {"remove_listener", (PyCFunction)Engine_remove_listener, METH_O, "stop accepting on this fd"},
    {"sweep", (PyCFunction)(void (*)(void))Engine_sweep, METH_FASTCALL,
     "sweep(idle, half_close): reset pairs idle past their bound; how many"},
    {"flush", (PyCFunction)Engine_flush, METH_NOARGS, "report the bytes open pairs moved since the last report"},
    {"close_all", (PyCFunction)Engine_close_all, METH_O, "close_all(abort): end every pair"},
    {"close_pair", (PyCFunction)(void (*)(void))Engine_close_pair, METH_FASTCALL, "close_pair(id, abort)"},
    {"set_draining", (PyCFunction)Engine_set_draining, METH_O, "reset new connections from now on"},
    {"set_pod_networks", (PyCFunction)Engine_set_pod_networks, METH_O,
     "set_pod_networks(((4|6, network bytes, prefixlen), ...)): whose address a mode 2 dial keeps"},
    {"connections", (PyCFunction)Engine_connections, METH_NOARGS, "a tuple per open pair"},
    {"ids", (PyCFunction)Engine_ids, METH_NOARGS, "the ids of the open pairs"},
    {"detach", (PyCFunction)Engine_detach, METH_NOARGS, "hand every established pair out"},
    {"adopt", (PyCFunction)Engine_adopt, METH_VARARGS, "take up a pair another process detached"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "end every pair and close the epoll set"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"count", (getter)Engine_get_count, NULL, "open pairs (dialing or established)", NULL},
    {"pipe_grown", (getter)Engine_get_pipe_grown, NULL, "bytes of pipe above 64 KiB held now (see \"Pipes\")", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pyproxy.dataplane._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "the splice relay's connection engine (see engine.c's header)",
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
};

/* policy(splice_after, bulk_read, copy_after, op, value, n): the engine's copy policy,
 * for the parity test with model/copymode.py. op 0: copy_read(streak=value, n);
 * op 1: splice_round(small=value, n); op 2: back_to_copy(small=value) as 0/1. */
static PyObject *policy(PyObject *self, PyObject *args) {
    Engine probe;
    int op;
    long value, n;
    if (!PyArg_ParseTuple(args, "lllill", &probe.splice_after, &probe.bulk_read, &probe.copy_after, &op, &value, &n))
        return NULL;
    switch (op) {
    case 0:
        return PyLong_FromLong(copy_read(&probe, value, n));
    case 1:
        return PyLong_FromLong(splice_round(&probe, value, n));
    case 2:
        return PyLong_FromLong(value >= probe.copy_after);
    }
    PyErr_SetString(PyExc_ValueError, "op is 0, 1 or 2");
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"policy", policy, METH_VARARGS, "the copy policy's answers (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    if ((str_active = PyUnicode_InternFromString("active")) == NULL ||
        (str_total = PyUnicode_InternFromString("total")) == NULL ||
        (str_bytes_in = PyUnicode_InternFromString("bytes_in")) == NULL ||
        (str_bytes_out = PyUnicode_InternFromString("bytes_out")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "BUFFER_SIZE", BUFFER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SPLICE_NOW", SPLICE_NOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
