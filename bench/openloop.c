/*
 * openloop: IssueCoupon over HTTP/1.1 at a fixed schedule (open loop) or as fast as the
 * server answers (closed loop), from one thread on one epoll loop.
 *
 * Open loop (--rate R): request i is due at start + i / R whatever happened to the ones
 * before it; it goes out on an idle keep-alive connection or waits for one, and its
 * latency counts from the due time (no coordinated omission). Closed loop (--rate 0):
 * every connection sends its next request as soon as it has the answer to the last.
 * Each request is binary protobuf with a user of its own ("<prefix>-<n>"), like
 * bench/issue.lua. Answers are classed by HTTP status (200 issued, 429 sold out, 503
 * unavailable, anything else), plus time-outs and connection errors. Prints one line
 * "BENCH_RESULT {json}": counts, latency percentiles and histograms per class, completions
 * per time bucket, and whether the generator kept its own schedule.
 *
 * The bench compiles it with the machine's gcc on first use (bench/generators.py):
 *   gcc -O2 -o openloop openloop.c -lm
 *   ./openloop --port 8000 --campaign <id> --users run1 --rate 5000 --duration 10
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define ISSUE_PATH "/coupon.v1.CouponService/IssueCoupon"
#define BUF_SIZE 16384
#define MAX_EVENTS 512

enum { C_OK, C_SOLD_OUT, C_UNAVAILABLE, C_OTHER, C_CLASSES };
static const char *CLASS_NAMES[C_CLASSES] = {"ok", "sold_out", "unavailable", "other"};

/* ---- histogram: microseconds, 1 us steps to 1024 us, then 512 steps per power of two ---- */
#define H_LINEAR 1024
#define H_SUB 512
#define H_POWERS 26
#define H_BUCKETS (H_LINEAR + H_SUB * H_POWERS)

typedef struct {
    uint64_t counts[H_BUCKETS];
    uint64_t total;
    uint64_t max_us;
} hist_t;

static int h_index(uint64_t us) {
    if (us < H_LINEAR) return (int)us;
    int power = 63 - __builtin_clzll(us) - 9; /* us >> power is in [512, 1024) */
    if (power > H_POWERS) return H_BUCKETS - 1;
    return H_LINEAR + (power - 1) * H_SUB + (int)((us >> power) - H_SUB);
}

static uint64_t h_upper(int index) { /* the largest value a bucket holds */
    if (index < H_LINEAR) return (uint64_t)index;
    int power = (index - H_LINEAR) / H_SUB + 1;
    uint64_t sub = (uint64_t)((index - H_LINEAR) % H_SUB) + H_SUB;
    return ((sub + 1) << power) - 1;
}

static void h_record(hist_t *h, int64_t ns) {
    uint64_t us = ns < 0 ? 0 : (uint64_t)ns / 1000;
    h->counts[h_index(us)]++;
    h->total++;
    if (us > h->max_us) h->max_us = us;
}

static double h_percentile_ms(const hist_t *h, double q) {
    if (!h->total) return -1;
    uint64_t rank = (uint64_t)ceil(q / 100.0 * (double)h->total);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = h_upper(i);
            return (double)(v < h->max_us ? v : h->max_us) / 1000.0;
        }
    }
    return (double)h->max_us / 1000.0;
}

static void h_json(FILE *out, const char *name, const hist_t *h) {
    fprintf(out, "\"%s\": {\"count\": %llu", name, (unsigned long long)h->total);
    if (h->total) {
        fprintf(out, ", \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p99.9\": %.3f, "
                     "\"max\": %.3f",
                h_percentile_ms(h, 50), h_percentile_ms(h, 90), h_percentile_ms(h, 99),
                h_percentile_ms(h, 99.9), (double)h->max_us / 1000.0);
        /* Sparse: [upper bound in us, count] for every bucket that counted something. */
        fprintf(out, ", \"buckets_us\": [");
        int first = 1;
        for (int i = 0; i < H_BUCKETS; i++) {
            if (!h->counts[i]) continue;
            fprintf(out, "%s[%llu, %llu]", first ? "" : ", ", (unsigned long long)h_upper(i),
                    (unsigned long long)h->counts[i]);
            first = 0;
        }
        fprintf(out, "]");
    }
    fprintf(out, "}");
}

/* ---- options ---- */
static const char *opt_host = "127.0.0.1";
static int opt_port = 8000;
static const char *opt_campaign = NULL;
static const char *opt_users = "openloop";
static double opt_rate = 1000;        /* 0: closed loop */
static double opt_duration = 10;      /* seconds of sending */
static int opt_connections = 128;
static double opt_timeout = 10;       /* seconds from send (or from due, while queued) */
static double opt_drain = 10;         /* seconds to wait for answers after the last send */
static double opt_bucket = 0.1;       /* seconds per timeline bucket */
static int opt_realtime = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- state ---- */
typedef enum { S_CLOSED, S_CONNECTING, S_IDLE, S_BUSY } state_t;

typedef struct {
    int fd;
    state_t state;
    int64_t due;  /* the in-flight request's intended time */
    int64_t sent;
    char buf[BUF_SIZE];
    size_t len;
    char out[1024];
    size_t out_len, out_off;
    int on_stack;
} conn_t;

static conn_t *conns;
static conn_t **idle_stack; /* connections that went idle, newest on top (some since busy) */
static int idle_top;
static int epfd, tfd;
static struct sockaddr_in addr;
static int64_t start_ns, stop_ns;
static uint64_t total_due, next_index; /* open loop: requests due in all, and dispatched */
static uint64_t sent_count;
static int64_t *queue_due; /* open loop: due times waiting for a connection (FIFO ring) */
static uint64_t queue_head, queue_tail, queue_cap, queue_max;

static hist_t hist[C_CLASSES], service_hist, lag_hist;
static uint64_t answered[C_CLASSES], statuses[600];
static uint64_t timeouts, expired_in_queue, conn_errors, connect_failures, unfinished;
static uint64_t *timeline[C_CLASSES + 1]; /* + failures (time-outs, connection errors) */
static int timeline_len;
static int64_t last_dispatch_ns;
static char head_prefix[512];
static size_t head_prefix_len;
static char campaign_field[300];
static size_t campaign_field_len;

static void timeline_add(int klass, int64_t at) {
    int b = (int)((at - start_ns) / (int64_t)(opt_bucket * 1e9));
    if (b < 0) b = 0;
    if (b >= timeline_len) b = timeline_len - 1;
    timeline[klass][b]++;
}

static size_t varint(char *out, size_t n) {
    size_t i = 0;
    while (n >= 0x80) {
        out[i++] = (char)((n & 0x7f) | 0x80);
        n >>= 7;
    }
    out[i++] = (char)n;
    return i;
}

static void build_request(conn_t *c, uint64_t number) {
    char user[160], body[512];
    int user_len = snprintf(user, sizeof user, "%s-%llu", opt_users, (unsigned long long)number);
    size_t n = 0;
    memcpy(body, campaign_field, campaign_field_len);
    n += campaign_field_len;
    body[n++] = 0x12;
    n += varint(body + n, (size_t)user_len);
    memcpy(body + n, user, (size_t)user_len);
    n += (size_t)user_len;
    memcpy(c->out, head_prefix, head_prefix_len);
    c->out_len = head_prefix_len;
    c->out_len += (size_t)sprintf(c->out + c->out_len, "%zu\r\n\r\n", n);
    memcpy(c->out + c->out_len, body, n);
    c->out_len += n;
    c->out_off = 0;
}

static void conn_open(conn_t *c);

static void conn_close(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = S_CLOSED;
    c->len = 0;
}

/* The connection broke (or timed out) with a request on it: count it, open another. A
 * connect that failed is retried by the next sweep (within 5 ms), not at once: a server
 * that refuses connections is not to be hammered. */
static void conn_fail(conn_t *c, int timed_out) {
    int64_t now = now_ns();
    int connecting = c->state == S_CONNECTING;
    if (c->state == S_BUSY) {
        if (timed_out) timeouts++;
        else conn_errors++;
        timeline_add(C_CLASSES, now);
    } else if (connecting) {
        connect_failures++;
    }
    conn_close(c);
    if (!connecting) conn_open(c);
}

static void flush_out(conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                return;
            }
            conn_fail(c, 0);
            return;
        }
        c->out_off += (size_t)w;
    }
}

static void send_on(conn_t *c, int64_t due) {
    c->state = S_BUSY;
    c->due = due;
    c->sent = now_ns();
    build_request(c, sent_count++);
    flush_out(c);
}

static int have_work(int64_t now) {
    if (opt_rate > 0) return queue_head != queue_tail;
    return now < stop_ns;
}

/* An idle connection takes the oldest waiting request (open loop) or the next (closed). */
static void on_idle(conn_t *c) {
    int64_t now = now_ns();
    c->state = S_IDLE;
    if (opt_rate > 0) {
        while (queue_head != queue_tail) {
            int64_t due = queue_due[queue_head++ % queue_cap];
            if (now - due > (int64_t)(opt_timeout * 1e9)) { /* a client would have given up */
                expired_in_queue++;
                timeline_add(C_CLASSES, now);
                continue;
            }
            send_on(c, due);
            return;
        }
    } else if (have_work(now)) {
        send_on(c, now);
        return;
    }
    if (!c->on_stack) {
        c->on_stack = 1;
        idle_stack[idle_top++] = c;
    }
}

static conn_t *pop_idle(void) {
    while (idle_top > 0) {
        conn_t *c = idle_stack[--idle_top];
        c->on_stack = 0;
        if (c->state == S_IDLE) return c;
    }
    return NULL;
}

static void conn_open(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        connect_failures++;
        c->state = S_CLOSED;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = S_CONNECTING;
    c->len = 0;
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (r < 0 && errno != EINPROGRESS) {
        connect_failures++;
        close(c->fd);
        c->fd = -1;
        c->state = S_CLOSED;
        return;
    }
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static int classify(int status) {
    if (status == 200) return C_OK;
    if (status == 429) return C_SOLD_OUT;
    if (status == 503) return C_UNAVAILABLE;
    return C_OTHER;
}

/* A header's value as a number, or -1 (the name given in lower case, with its colon). */
static long header_number(const char *head, size_t head_len, const char *name) {
    size_t name_len = strlen(name);
    for (size_t i = 0; i + name_len < head_len; i++) {
        if ((i == 0 || head[i - 1] == '\n') && strncasecmp(head + i, name, name_len) == 0) {
            return strtol(head + i + name_len, NULL, 10);
        }
    }
    return -1;
}

static int header_has(const char *head, size_t head_len, const char *name, const char *value) {
    size_t name_len = strlen(name);
    for (size_t i = 0; i + name_len < head_len; i++) {
        if ((i == 0 || head[i - 1] == '\n') && strncasecmp(head + i, name, name_len) == 0) {
            const char *v = head + i + name_len;
            while (*v == ' ') v++;
            return strncasecmp(v, value, strlen(value)) == 0;
        }
    }
    return 0;
}

static void on_readable(conn_t *c) {
    for (;;) {
        if (c->len == BUF_SIZE) { /* a response larger than ours ever are */
            conn_fail(c, 0);
            return;
        }
        ssize_t r = read(c->fd, c->buf + c->len, BUF_SIZE - c->len);
        if (r == 0) {
            conn_fail(c, 0);
            return;
        }
        if (r < 0) {
            if (errno == EAGAIN) return;
            conn_fail(c, 0);
            return;
        }
        c->len += (size_t)r;
        for (;;) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) break;
            size_t head_len = (size_t)(end - c->buf) + 4;
            long body_len = header_number(c->buf, head_len, "content-length:");
            if (body_len < 0 || c->state != S_BUSY || c->len < 12) {
                conn_fail(c, 0);
                return;
            }
            if (c->len < head_len + (size_t)body_len) break;
            int status = atoi(c->buf + 9);
            int closing = header_has(c->buf, head_len, "connection:", "close");
            int64_t now = now_ns();
            int klass = classify(status);
            answered[klass]++;
            if (status > 0 && status < 600) statuses[status]++;
            h_record(&hist[klass], now - c->due);
            h_record(&service_hist, now - c->sent);
            timeline_add(klass, now);
            size_t used = head_len + (size_t)body_len;
            memmove(c->buf, c->buf + used, c->len - used);
            c->len -= used;
            if (closing) {
                c->state = S_IDLE;
                conn_close(c);
                conn_open(c);
                return;
            }
            on_idle(c);
            if (c->state != S_BUSY) return;
        }
    }
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            conn_fail(c, 0);
            return;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        on_idle(c);
        return;
    }
    if (events & EPOLLOUT) {
        flush_out(c);
        if (c->fd >= 0 && c->out_off == c->out_len) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        }
    }
    if (c->fd >= 0 && (events & (EPOLLIN | EPOLLERR | EPOLLHUP))) on_readable(c);
}

static int64_t due_of(uint64_t i) { return start_ns + (int64_t)((double)i * 1e9 / opt_rate); }

static void arm_timer(int64_t at) {
    struct itimerspec spec = {0};
    spec.it_value.tv_sec = at / 1000000000LL;
    spec.it_value.tv_nsec = at % 1000000000LL;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &spec, NULL);
}

/* Open loop: every request due by now goes out (or waits for a connection). */
static void dispatch_due(void) {
    int64_t now = now_ns();
    while (next_index < total_due && due_of(next_index) <= now) {
        int64_t due = due_of(next_index++);
        h_record(&lag_hist, now - due);
        last_dispatch_ns = now;
        conn_t *idle = queue_head == queue_tail ? pop_idle() : NULL;
        if (idle) {
            send_on(idle, due);
        } else {
            queue_due[queue_tail++ % queue_cap] = due;
            uint64_t waiting = queue_tail - queue_head;
            if (waiting > queue_max) queue_max = waiting;
        }
    }
    if (next_index < total_due) arm_timer(due_of(next_index));
}

static void expire(int64_t now) {
    int64_t limit = (int64_t)(opt_timeout * 1e9);
    for (int k = 0; k < opt_connections; k++) {
        conn_t *c = &conns[k];
        if (c->state == S_BUSY && now - c->sent > limit) conn_fail(c, 1);
        else if (c->state == S_CLOSED) conn_open(c);
    }
}

static int in_flight(void) {
    int n = 0;
    for (int k = 0; k < opt_connections; k++) n += conns[k].state == S_BUSY;
    return n;
}

static void usage(void) {
    fprintf(stderr,
            "usage: openloop --campaign ID [--host H] [--port P] [--users PREFIX] [--rate R "
            "(0: closed loop)] [--duration S] [--connections N] [--timeout S] [--drain S] "
            "[--bucket S] [--realtime]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--realtime")) { opt_realtime = 1; continue; }
        if (!v) usage();
        if (!strcmp(a, "--host")) opt_host = v;
        else if (!strcmp(a, "--port")) opt_port = atoi(v);
        else if (!strcmp(a, "--campaign")) opt_campaign = v;
        else if (!strcmp(a, "--users")) opt_users = v;
        else if (!strcmp(a, "--rate")) opt_rate = atof(v);
        else if (!strcmp(a, "--duration")) opt_duration = atof(v);
        else if (!strcmp(a, "--connections")) opt_connections = atoi(v);
        else if (!strcmp(a, "--timeout")) opt_timeout = atof(v);
        else if (!strcmp(a, "--drain")) opt_drain = atof(v);
        else if (!strcmp(a, "--bucket")) opt_bucket = atof(v);
        else usage();
        i++;
    }
    if (!opt_campaign || opt_connections < 1 || opt_duration <= 0 || opt_rate < 0 ||
        opt_bucket <= 0 || strlen(opt_campaign) > 200 || strlen(opt_users) > 120)
        usage();
    int realtime = 0;
    if (opt_realtime) { /* the schedule then holds on a busy machine; it sleeps between sends */
        struct sched_param param = {.sched_priority = 10};
        realtime = sched_setscheduler(0, SCHED_FIFO, &param) == 0;
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &addr.sin_addr) != 1) usage();
    head_prefix_len = (size_t)snprintf(
        head_prefix, sizeof head_prefix,
        "POST " ISSUE_PATH " HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/proto\r\n"
        "Connect-Protocol-Version: 1\r\nContent-Length: ",
        opt_host, opt_port);
    size_t campaign_len = strlen(opt_campaign);
    campaign_field[0] = 0x0a;
    campaign_field_len = 1 + varint(campaign_field + 1, campaign_len);
    memcpy(campaign_field + campaign_field_len, opt_campaign, campaign_len);
    campaign_field_len += campaign_len;

    timeline_len = (int)ceil((opt_duration + opt_drain) / opt_bucket) + 1;
    for (int k = 0; k <= C_CLASSES; k++) timeline[k] = calloc((size_t)timeline_len, 8);
    total_due = opt_rate > 0 ? (uint64_t)llround(opt_rate * opt_duration) : 0;
    queue_cap = total_due + 1;
    queue_due = malloc(queue_cap * sizeof *queue_due);
    conns = calloc((size_t)opt_connections, sizeof *conns);
    idle_stack = calloc((size_t)opt_connections, sizeof *idle_stack);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);
    if (!queue_due || !conns || !idle_stack || epfd < 0 || tfd < 0) {
        perror("openloop");
        return 2;
    }

    /* Connections first, then the schedule: the first requests do not pay for connecting. */
    start_ns = now_ns() + 1000000000LL; /* a placeholder until connected */
    stop_ns = start_ns;
    for (int k = 0; k < opt_connections; k++) {
        conns[k].fd = -1;
        conn_open(&conns[k]);
    }
    struct epoll_event events[MAX_EVENTS];
    int64_t give_up = now_ns() + 5000000000LL;
    int64_t reopened = now_ns();
    for (;;) {
        int connected = 0;
        int reopen = now_ns() - reopened > 10000000LL; /* failed connects, every 10 ms */
        if (reopen) reopened = now_ns();
        for (int k = 0; k < opt_connections; k++) {
            connected += conns[k].state == S_IDLE;
            if (reopen && conns[k].state == S_CLOSED) conn_open(&conns[k]);
        }
        if (connected == opt_connections || now_ns() > give_up) break;
        int n = epoll_wait(epfd, events, MAX_EVENTS, 10);
        for (int e = 0; e < n; e++)
            if (events[e].data.ptr) {
                conn_t *c = events[e].data.ptr;
                if (c->state == S_CONNECTING) {
                    int err = 0;
                    socklen_t len = sizeof err;
                    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                    if (err) { conn_fail(c, 0); continue; }
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                    c->state = S_IDLE;
                }
            }
    }
    start_ns = now_ns() + 10000000LL;
    stop_ns = start_ns + (int64_t)(opt_duration * 1e9);
    int64_t drain_until = stop_ns + (int64_t)(opt_drain * 1e9);
    while (now_ns() < start_ns) {}
    for (int k = 0; k < opt_connections; k++)
        if (conns[k].state == S_IDLE) on_idle(&conns[k]);
    if (opt_rate > 0) arm_timer(start_ns);
    int64_t last_expiry = now_ns();
    for (;;) {
        int64_t now = now_ns();
        int sending = opt_rate > 0 ? next_index < total_due : now < stop_ns;
        if (!sending && queue_head == queue_tail && in_flight() == 0) break;
        if (now > drain_until) break;
        int n = epoll_wait(epfd, events, MAX_EVENTS, 5);
        for (int e = 0; e < n; e++) {
            if (events[e].data.ptr == NULL) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) perror("timerfd");
                dispatch_due();
                continue;
            }
            on_event(events[e].data.ptr, events[e].events);
        }
        now = now_ns();
        if (now - last_expiry > 5000000LL) {
            last_expiry = now;
            expire(now);
        }
    }
    int64_t finished_ns = now_ns();
    unfinished = (uint64_t)in_flight() + (queue_tail - queue_head);
    if (opt_rate > 0) unfinished += total_due - next_index;

    uint64_t answered_all = 0;
    for (int k = 0; k < C_CLASSES; k++) answered_all += answered[k];
    double window = (double)(stop_ns - start_ns) / 1e9;
    double lag_p99 = h_percentile_ms(&lag_hist, 99);
    double behind_ms = opt_rate > 0 && next_index ? (double)(last_dispatch_ns - due_of(next_index - 1)) / 1e6 : 0;
    int kept_up = opt_rate <= 0 || (next_index == total_due && lag_p99 <= 1.0 && behind_ms <= 100);

    FILE *out = stdout;
    fprintf(out, "BENCH_RESULT {\"model\": \"%s\", \"rate\": %.3f, \"duration_s\": %.3f, "
                 "\"connections\": %d, \"timeout_s\": %.3f, \"realtime_priority\": %s, ",
            opt_rate > 0 ? "open" : "closed", opt_rate, window, opt_connections, opt_timeout,
            realtime ? "true" : "false");
    fprintf(out, "\"sent\": %llu, \"due\": %llu, \"answered\": %llu, \"timeouts\": %llu, "
                 "\"expired_in_queue\": %llu, \"connection_errors\": %llu, "
                 "\"connect_failures\": %llu, \"unfinished\": %llu, \"max_waiting\": %llu, "
                 "\"elapsed_s\": %.3f, ",
            (unsigned long long)sent_count, (unsigned long long)total_due,
            (unsigned long long)answered_all, (unsigned long long)timeouts,
            (unsigned long long)expired_in_queue, (unsigned long long)conn_errors,
            (unsigned long long)connect_failures, (unsigned long long)unfinished,
            (unsigned long long)queue_max, (double)(finished_ns - start_ns) / 1e9);
    fprintf(out, "\"kept_up\": %s, \"behind_ms\": %.3f, ", kept_up ? "true" : "false", behind_ms);
    fprintf(out, "\"answers\": {");
    for (int k = 0; k < C_CLASSES; k++)
        fprintf(out, "%s\"%s\": %llu", k ? ", " : "", CLASS_NAMES[k], (unsigned long long)answered[k]);
    fprintf(out, "}, \"statuses\": {");
    int first = 1;
    for (int s = 0; s < 600; s++) {
        if (!statuses[s]) continue;
        fprintf(out, "%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)statuses[s]);
        first = 0;
    }
    fprintf(out, "}, \"latency_ms\": {");
    for (int k = 0; k < C_CLASSES; k++) {
        if (k) fprintf(out, ", ");
        h_json(out, CLASS_NAMES[k], &hist[k]);
    }
    fprintf(out, "}, ");
    h_json(out, "service_time_ms", &service_hist);
    fprintf(out, ", ");
    h_json(out, "dispatch_lag_ms", &lag_hist);
    fprintf(out, ", \"timeline\": {\"bucket_s\": %.3f", opt_bucket);
    for (int k = 0; k <= C_CLASSES; k++) {
        fprintf(out, ", \"%s\": [", k < C_CLASSES ? CLASS_NAMES[k] : "failed");
        int last = timeline_len - 1;
        while (last > 0 && !timeline[0][last] && !timeline[1][last] && !timeline[2][last] &&
               !timeline[3][last] && !timeline[4][last])
            last--;
        for (int b = 0; b <= last; b++)
            fprintf(out, "%s%llu", b ? ", " : "", (unsigned long long)timeline[k][b]);
        fprintf(out, "]");
    }
    fprintf(out, "}}\n");
    fflush(out);
    return 0;
}
