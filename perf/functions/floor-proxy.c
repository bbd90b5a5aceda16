/*
 * A reference floor for servers that run each function instance in a process
 * of its own: the simplest such proxy, doing little beyond the unavoidable. It
 * accepts HTTP clients, hands each request (as a fixed 64-byte message, nothing
 * parsed) to an idle Node process over a Unix stream socket, one request per
 * process at a time, and writes a fixed HTTP answer when the process answers
 * (500 when it reports a failure). No HTTP parsing beyond "a read arrived", no
 * event JSON, no scheduler, no limits: what it costs per request is the
 * sockets, the wakeups and the context switches between the proxy and Node,
 * plus Node's own work. It is one design of that shape (level-triggered epoll,
 * a plain read and write per step), not a proven lower bound: batching or
 * shared memory could go below it. perf/functions/floor.sh runs it beside
 * hearth and bare Node.
 *
 *   gcc -O2 perf/functions/floor-proxy.c -o /tmp/floor-proxy
 *   /tmp/floor-proxy INSTANCES node perf/functions/floor-instance.js [DIR FILE.EXPORT ...]
 *
 * Listens on 127.0.0.1 at a free port and prints "listening <port>"; starts
 * INSTANCES copies of COMMAND (searched in PATH) with its end of a socket pair
 * as their fd 3. FLOOR_PIPES=1 (understood by floor-instance.js and the shim)
 * gives them a pair of pipes instead: fd 3 reads requests, fd 4 writes answers. FLOOR_PORT=P listens on port P instead, with SO_REUSEPORT:
 * one proxy per core on one port, each with its own instances, is the floor
 * of a thread-per-core server. Requests that find every instance
 * busy wait in a FIFO. Assumes each client read holds exactly one request (wrk
 * without pipelining); a client that sends more is answered once per read. A
 * client that hangs up with requests in flight is closed, unanswered, once the
 * last of them is done. Answers are a few dozen bytes, written with one write.
 *
 * With FLOOR_HANDLER set (e.g. "app.handler"), the instances are hearth's own
 * runtime shim (include/runtime/bootstrap.js) spoken to in hearth's frames
 * (include/hearth_protocol.h): each gets a HELLO for that handler in
 * FLOOR_TASK_ROOT and must answer READY; each request goes over as an INVOKE
 * with the fixed metadata FLOOR_META and body FLOOR_BODY (what hearth would
 * send for the benchmark's request; FLOOR_HANDLER and FLOOR_TASK_ROOT go into
 * the HELLO's JSON as they are, so they must not hold quotes or backslashes),
 * and the instance's RESPONSE (200 unless its status is not 200) or ERROR (500)
 * frame, LOG frames skipped, ends it. That is the floor plus the shim.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_INSTANCES 64
#define FRAME_HEADER 16
#define FRAME_MAX (1 << 20) /* largest answer frame taken (the benchmark's are tiny) */
#define T_HELLO 1
#define T_INVOKE 2
#define T_READY 16
#define T_RESPONSE 18
#define T_ERROR 19
#define T_LOG 20

static const char ANSWER[] =
    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello";
/* When the instance reports a failure: wrk counts it as an error. */
static const char FAILED[] =
    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\nfailed";

static int epfd;
static int inst_fd[MAX_INSTANCES];
static int inst_out[MAX_INSTANCES]; /* where requests are written (== inst_fd for a socket) */
static int inst_client[MAX_INSTANCES]; /* client fd being served, or -1 */
static int n_inst;
static int waiting[MAX_FDS]; /* FIFO of client fds */
static int wait_head, wait_len;
static int fd_instance[MAX_FDS]; /* fd -> instance index + 1 (0: a client) */
static unsigned short in_service[MAX_FDS]; /* a client's requests queued or being served */
static char gone[MAX_FDS]; /* ...and the client hung up: close once they are done */
/* Frames mode: the INVOKE frame sent for every request, and what each
 * instance has sent of its current answer. */
static char *invoke;
static size_t invoke_len;
static char *inst_buf[MAX_INSTANCES];
static size_t inst_fill[MAX_INSTANCES];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void watch(int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

/* Answers one request of a client (`ok`: with 200, else 500); a client that
 * hung up gets nothing and is closed when its last request is done. */
static void answer(int client, int ok) {
    in_service[client]--;
    if (gone[client]) {
        if (in_service[client] == 0) {
            gone[client] = 0;
            close(client);
        }
        return;
    }
    const char *text = ok ? ANSWER : FAILED;
    size_t len = ok ? sizeof ANSWER - 1 : sizeof FAILED - 1;
    if (write(client, text, len) < 0 && errno != EPIPE && errno != ECONNRESET) die("write to client");
}

static void hand_over(int i, int client) {
    char msg[64];
    inst_client[i] = client;
    if (invoke != NULL) {
        if (write(inst_out[i], invoke, invoke_len) != (ssize_t)invoke_len) die("write to instance");
        return;
    }
    memset(msg, 'r', sizeof msg);
    if (write(inst_out[i], msg, sizeof msg) != sizeof msg) die("write to instance");
}

static uint32_t le32(const unsigned char *p) {
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A frame of `type` with `meta` and `body` (either may be NULL), malloc'ed. */
static char *frame(int type, const char *meta, const char *body, size_t *len) {
    size_t ml = meta ? strlen(meta) : 0, bl = body ? strlen(body) : 0;
    unsigned char *f = malloc(FRAME_HEADER + ml + bl);
    if (f == NULL) die("malloc");
    uint32_t words[3] = {1, (uint32_t)ml, (uint32_t)bl}; /* id (any), meta length, body length */
    f[0] = 0x54; /* magic 0x4854, little-endian */
    f[1] = 0x48;
    f[2] = type;
    f[3] = 0;
    for (int w = 0; w < 3; w++)
        for (int b = 0; b < 4; b++) f[4 + 4 * w + b] = words[w] >> (8 * b);
    if (ml != 0) memcpy(f + FRAME_HEADER, meta, ml);
    if (bl != 0) memcpy(f + FRAME_HEADER + ml, body, bl);
    *len = FRAME_HEADER + ml + bl;
    return (char *)f;
}

/* Drops the first complete frame instance `i` sent and returns its type; 0
 * while the first frame is still incomplete. `*ok` says whether it was a
 * RESPONSE with status 200. */
static int next_frame(int i, int *ok) {
    unsigned char *b = (unsigned char *)inst_buf[i];
    if (inst_fill[i] < FRAME_HEADER) return 0;
    if (b[0] != 0x54 || b[1] != 0x48) {
        fprintf(stderr, "floor-proxy: an instance sent a frame without the magic\n");
        exit(1);
    }
    size_t len = FRAME_HEADER + (size_t)le32(b + 8) + le32(b + 12);
    if (len > FRAME_MAX) {
        fprintf(stderr, "floor-proxy: an instance sent a frame of %zu bytes\n", len);
        exit(1);
    }
    if (inst_fill[i] < len) return 0;
    int type = b[2];
    static const char STATUS_200[] = "\"status\":200,";
    *ok = type == T_RESPONSE &&
          memmem(b + FRAME_HEADER, le32(b + 8), STATUS_200, sizeof STATUS_200 - 1) != NULL;
    memmove(b, b + len, inst_fill[i] - len);
    inst_fill[i] -= len;
    return type;
}

/* Whether instance `i` has now sent its whole answer (LOG frames skipped),
 * and in `*ok` whether it succeeded. */
static int answer_frame_done(int i, int *ok) {
    int type;
    while ((type = next_frame(i, ok)) > 0)
        if (type == T_RESPONSE || type == T_ERROR) return 1;
    return 0;
}

/* Sends HELLO to every instance and waits for each READY. */
static void hello_all(const char *handler, const char *task_root) {
    char meta[4096];
    snprintf(meta, sizeof meta,
             "{\"function\":\"floor\",\"handler\":\"%s\",\"task_root\":\"%s\","
             "\"memory_mb\":128,\"timeout_ms\":30000,\"env\":{}}",
             handler, task_root);
    size_t len;
    char *hello = frame(T_HELLO, meta, NULL, &len);
    for (int i = 0; i < n_inst; i++) {
        if (write(inst_out[i], hello, len) != (ssize_t)len) die("HELLO");
        inst_buf[i] = malloc(FRAME_MAX);
        if (inst_buf[i] == NULL) die("malloc");
        for (;;) {
            ssize_t n = read(inst_fd[i], inst_buf[i] + inst_fill[i], FRAME_MAX - inst_fill[i]);
            if (n <= 0) die("waiting for READY");
            inst_fill[i] += n;
            int type, ok;
            while ((type = next_frame(i, &ok)) > 0) {
                if (type == T_READY) goto ready;
                if (type != T_LOG) {
                    fprintf(stderr, "floor-proxy: the runtime answered HELLO with frame type %d\n", type);
                    exit(1);
                }
            }
        }
    ready:;
    }
    free(hello);
}

static void on_client(int fd) {
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN) return;
        if (in_service[fd]) { /* wrk hangs up with requests in flight at the end of a run */
            gone[fd] = 1;
            epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
        } else {
            close(fd);
        }
        return;
    }
    in_service[fd]++;
    for (int i = 0; i < n_inst; i++) {
        if (inst_client[i] < 0) {
            hand_over(i, fd);
            return;
        }
    }
    if (wait_len == MAX_FDS) die("queue full");
    waiting[(wait_head + wait_len++) % MAX_FDS] = fd;
}

static void on_instance(int i) {
    char buf[256];
    int ok;
    if (invoke != NULL) {
        ssize_t n = read(inst_fd[i], inst_buf[i] + inst_fill[i], FRAME_MAX - inst_fill[i]);
        if (n <= 0) die("instance went away");
        inst_fill[i] += n;
        if (!answer_frame_done(i, &ok)) return;
    } else {
        if (read(inst_fd[i], buf, sizeof buf) <= 0) die("instance went away");
        ok = buf[0] != 'e'; /* floor-instance.js answers 'e's when the handler failed */
    }
    answer(inst_client[i], ok);
    inst_client[i] = -1;
    while (wait_len != 0) {
        int next = waiting[wait_head];
        wait_head = (wait_head + 1) % MAX_FDS;
        wait_len--;
        if (gone[next]) {
            answer(next, 0); /* nothing is written to it */
            continue;
        }
        hand_over(i, next);
        break;
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s INSTANCES COMMAND [ARGS...]\n", argv[0]);
        return 2;
    }
    n_inst = atoi(argv[1]);
    if (n_inst < 1 || n_inst > MAX_INSTANCES) {
        fprintf(stderr, "INSTANCES must be 1..%d\n", MAX_INSTANCES);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");

    int pipes = getenv("FLOOR_PIPES") != NULL;
    for (int i = 0; i < n_inst; i++) {
        /* The proxy reads ch[0] and writes ch[1]; the instance gets kid[0]
         * as fd 3 and, with pipes, kid[1] as fd 4. */
        int ch[2], kid[2];
        if (pipes) {
            int down[2], up[2];
            if (pipe2(down, O_CLOEXEC) < 0 || pipe2(up, O_CLOEXEC) < 0) die("pipe");
            ch[0] = up[0], ch[1] = down[1], kid[0] = down[0], kid[1] = up[1];
        } else {
            int sv[2];
            if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
            ch[0] = ch[1] = sv[0], kid[0] = kid[1] = sv[1];
        }
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            if (dup2(kid[0], 3) < 0 || (pipes && dup2(kid[1], 4) < 0)) die("dup2");
            execvp(argv[2], argv + 2);
            die("exec");
        }
        close(kid[0]);
        if (pipes) close(kid[1]);
        inst_fd[i] = ch[0];
        inst_out[i] = ch[1];
        inst_client[i] = -1;
        fd_instance[ch[0]] = i + 1;
        watch(ch[0]);
    }

    const char *handler = getenv("FLOOR_HANDLER");
    if (handler != NULL) {
        const char *root = getenv("FLOOR_TASK_ROOT"), *meta = getenv("FLOOR_META");
        if (root == NULL || meta == NULL) {
            fprintf(stderr, "FLOOR_HANDLER needs FLOOR_TASK_ROOT and FLOOR_META\n");
            return 2;
        }
        hello_all(handler, root);
        invoke = frame(T_INVOKE, meta, getenv("FLOOR_BODY"), &invoke_len);
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    const char *port = getenv("FLOOR_PORT");
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons(port ? atoi(port) : 0),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 1024) < 0) die("listen");
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("listening %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    watch(lfd);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(epfd, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (c < 0) continue;
                if (c >= MAX_FDS) {
                    close(c);
                    continue;
                }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                watch(c);
            } else if (fd_instance[fd] != 0) {
                on_instance(fd_instance[fd] - 1);
            } else {
                on_client(fd);
            }
        }
    }
}
