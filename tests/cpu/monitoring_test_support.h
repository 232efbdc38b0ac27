#pragma once
// Shared by the monitoring tests and core_prometheus_test: a plain HTTP/1.0 GET
// over a POSIX socket (to scrape the exporter or query a Prometheus server on
// loopback), a parser of the Prometheus text format, and the PromQL queries of
// the Grafana dashboard.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace ssa::monitoring::testing {

struct HttpResponse {
  int status = 0;     // 0: no connection or no valid response
  std::string body;
};

// HTTP/1.0 makes the server close the connection after the body (no chunked
// encoding, no keep-alive), so the response is everything read until EOF.
inline HttpResponse http_get(int port, const std::string& target, const char* address = "127.0.0.1") {
  HttpResponse response;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return response;
  timeval timeout{5, 0};  // a hung server fails the test instead of hanging it
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in peer{};
  peer.sin_family = AF_INET;
  peer.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, address, &peer.sin_addr);
  std::string raw;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&peer), sizeof(peer)) == 0) {
    const std::string request = "GET " + target + " HTTP/1.0\r\nHost: " + address + "\r\nConnection: close\r\n\r\n";
    if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
      char buffer[8192];
      for (ssize_t n; (n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0;) raw.append(buffer, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  // "HTTP/1.x 200 OK\r\n<headers>\r\n\r\n<body>"
  const size_t header_end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.", 0) != 0 || raw.size() < 12 || header_end == std::string::npos) return response;
  response.status = std::stoi(raw.substr(9, 3));
  response.body = raw.substr(header_end + 4);
  return response;
}

// A port that was free a moment ago on loopback (the kernel's pick for port 0).
inline int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  int port = -1;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0)
    port = ntohs(address.sin_port);
  if (fd >= 0) ::close(fd);
  return port;
}

// One sample line of the Prometheus text format: name{label="value",...} value
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses the sample lines of an exposition (comments and blank lines skipped).
// Label values are unescaped (\\ \" \n). A line whose value does not parse is
// left out; the tests then miss the sample they expect and fail.
inline std::vector<Sample> parse_samples(const std::string& text) {
  std::vector<Sample> samples;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    Sample sample;
    size_t i = line.find_first_of("{ ");
    if (i == std::string::npos) continue;
    sample.name = line.substr(0, i);
    if (line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const size_t eq = line.find('=', i);
        if (eq == std::string::npos || eq + 1 >= line.size() || line[eq + 1] != '"') break;
        const std::string key = line.substr(i, eq - i);
        std::string value;
        size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) {
            ++j;
            value += line[j] == 'n' ? '\n' : line[j];
          } else {
            value += line[j];
          }
        }
        sample.labels[key] = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      ++i;  // past '}'
    }
    try {
      sample.value = std::stod(line.substr(i));
    } catch (const std::exception&) {
      continue;
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

// Every PromQL string of a Grafana dashboard: panel target "expr"s and the
// template variables' "query"/"definition" strings, wherever they are nested.
inline void collect_queries(const nlohmann::json& node, std::vector<std::string>& out) {
  if (node.is_object()) {
    for (auto it = node.begin(); it != node.end(); ++it) {
      const bool promql_key = it.key() == "expr" || it.key() == "definition" ||
                              (it.key() == "query" && node.value("type", "") == "query");
      if (promql_key && it.value().is_string()) out.push_back(it.value().get<std::string>());
      else collect_queries(it.value(), out);
    }
  } else if (node.is_array()) {
    for (const auto& child : node) collect_queries(child, out);
  }
}

inline nlohmann::json load_dashboard() {
  const std::string path = std::string(SSA_SOURCE_DIR) + "/monitoring/grafana-dashboard.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(in);
}

// The ssa_ metric names a query refers to.
inline std::set<std::string> metric_names_in(const std::string& query) {
  static const std::regex name("ssa_[a-z_]+");
  std::set<std::string> names;
  for (std::sregex_iterator it(query.begin(), query.end(), name), end; it != end; ++it) names.insert(it->str());
  return names;
}

}  // namespace ssa::monitoring::testing
