/* sockserver: a TCP echo server on 127.0.0.1:ARGV1 and a UDP echo socket on
 * 127.0.0.1:ARGV2, for the socket tests (socket_test.go). Every line read
 * on a TCP connection is answered with "echo " and the line; every datagram
 * is sent back to its sender. Prints "READY" when both are bound. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 16

static int bound(int type, int port) {
	int fd = socket(AF_INET, type, 0);
	int one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		perror("bind");
		exit(1);
	}
	return fd;
}

int main(int argc, char **argv) {
	if (argc < 3)
		return 2;
	int l = bound(SOCK_STREAM, atoi(argv[1]));
	if (listen(l, 16) < 0) {
		perror("listen");
		return 1;
	}
	int u = bound(SOCK_DGRAM, atoi(argv[2]));
	struct pollfd p[MAXC + 2];
	char buf[MAXC][4096];
	size_t have[MAXC];
	int n = 0;
	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	for (;;) {
		p[0] = (struct pollfd){.fd = l, .events = POLLIN};
		p[1] = (struct pollfd){.fd = u, .events = POLLIN};
		if (poll(p, n + 2, -1) < 0)
			continue;
		for (int i = 0; i < n; i++) {
			if (!(p[i + 2].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t r = read(p[i + 2].fd, buf[i] + have[i], sizeof buf[i] - have[i]);
			if (r <= 0) {
				close(p[i + 2].fd);
				p[i + 2] = p[n + 1];
				memcpy(buf[i], buf[n - 1], have[n - 1]);
				have[i] = have[n - 1];
				n--;
				i--;
				continue;
			}
			have[i] += r;
			char *nl;
			while ((nl = memchr(buf[i], '\n', have[i])) != NULL) {
				size_t len = nl - buf[i] + 1;
				char out[4200];
				int m = snprintf(out, sizeof out, "echo %.*s", (int)len, buf[i]);
				if (write(p[i + 2].fd, out, m) != m)
					perror("write");
				memmove(buf[i], buf[i] + len, have[i] - len);
				have[i] -= len;
			}
		}
		if (p[0].revents & POLLIN && n < MAXC) {
			int c = accept(l, NULL, NULL);
			if (c >= 0) {
				p[n + 2] = (struct pollfd){.fd = c, .events = POLLIN};
				have[n++] = 0;
			}
		}
		if (p[1].revents & POLLIN) {
			char d[2048];
			struct sockaddr_in from;
			socklen_t fl = sizeof from;
			ssize_t r = recvfrom(u, d, sizeof d, 0, (struct sockaddr *)&from, &fl);
			if (r > 0)
				sendto(u, d, r, 0, (struct sockaddr *)&from, fl);
		}
	}
}
