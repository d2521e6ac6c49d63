/* A tiny HTTP/1.1 app for the docker driver's tests, built static so that
 * an image `FROM scratch` holding only this file runs it. Answers every
 * request with "$GREETING $DROVER_INSTANCE\n" (keep-alive, Content-Length);
 * /slow answers after 300 ms. Listens on $PORT; exits on SIGTERM. */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void serve(int c, const char *greeting, const char *instance) {
    char buf[8192];
    size_t len = 0;
    struct timeval tv = {60, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (;;) {
        char *end;
        while (!(end = memmem(buf, len, "\r\n\r\n", 4))) {
            if (len == sizeof buf) return;
            ssize_t n = read(c, buf + len, sizeof buf - len);
            if (n <= 0) return;
            len += (size_t)n;
        }
        size_t head = (size_t)(end - buf) + 4;
        int close_after = memmem(buf, head, "onnection: close", 16) != NULL;
        if (strncmp(buf, "GET /slow", 9) == 0) usleep(300000);
        char body[512], out[1024];
        int bl = snprintf(body, sizeof body, "%s %s\n", greeting, instance);
        int ol = snprintf(out, sizeof out,
                          "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                          "Content-Length: %d\r\n%s\r\n%s",
                          bl, close_after ? "Connection: close\r\n" : "", body);
        if (write(c, out, (size_t)ol) != ol || close_after) return;
        memmove(buf, buf + head, len - head);
        len -= head;
    }
}

int main(void) {
    signal(SIGTERM, on_term);
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    const char *greeting = getenv("GREETING") ? getenv("GREETING") : "none";
    const char *instance = getenv("DROVER_INSTANCE") ? getenv("DROVER_INSTANCE") : "-";
    int port = atoi(getenv("PORT") ? getenv("PORT") : "8000");
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) {
        perror("listen");
        return 1;
    }
    printf("greeter %s listening on port %d\n", greeting, port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        if (fork() == 0) {
            close(s);
            serve(c, greeting, instance);
            _exit(0);
        }
        close(c);
    }
}
