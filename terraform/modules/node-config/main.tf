# One gateway node's configuration file, rendered from variables. No provider: the module only
# evaluates functions, so `terraform init` needs no download and CI applies it for real.

terraform {
  required_version = ">= 1.5"
}

variable "node_id" {
  description = "Raft node id (>= 1); also names the node certificate node-<id>.portcullis.cluster."
  type        = number
  validation {
    condition     = var.node_id >= 1 && floor(var.node_id) == var.node_id
    error_message = "node_id must be a positive integer."
  }
}

variable "region" {
  description = "Region name, e.g. eu-west. Geography-aware balancing ranks regions by distance."
  type        = string
}

variable "latitude" {
  type    = number
  default = 0
}

variable "longitude" {
  type    = number
  default = 0
}

variable "advertise_ip" {
  description = "Address other nodes (and CVMs, for WireGuard) reach this node on."
  type        = string
}

variable "base_domains" {
  description = "Domains routed as <app>.<base>."
  type        = list(string)
}

variable "etc_dir" {
  description = "Where the config, PKI files and admin token live on the host."
  type        = string
  default     = "/etc/portcullis"
}

variable "data_dir" {
  type    = string
  default = "/var/lib/portcullis"
}

variable "ports" {
  description = "Listen ports. Defaults are the ones ARCHITECTURE.md §1 names."
  type = object({
    cluster = optional(number, 8000)
    admin   = optional(number, 9080)
    https   = optional(number, 443)
    http    = optional(number, 80)
    wg      = optional(number, 51820)
  })
  default = {}
}

variable "bind_ip" {
  description = "Address the public and cluster listeners bind. The admin API always binds loopback."
  type        = string
  default     = "0.0.0.0"
}

variable "acme" {
  description = "Automatic certificates; null leaves ACME off (import certificates instead)."
  type = object({
    directory = optional(string, "https://acme-v02.api.letsencrypt.org/directory")
    contact   = optional(list(string), [])
    challenge = optional(string, "http-01")
  })
  default = null
}

locals {
  config = templatefile("${path.module}/node.toml.tftpl", {
    node_id      = var.node_id
    region       = var.region
    latitude     = var.latitude
    longitude    = var.longitude
    advertise_ip = var.advertise_ip
    bind_ip      = var.bind_ip
    base_domains = var.base_domains
    etc_dir      = var.etc_dir
    data_dir     = var.data_dir
    ports        = var.ports
    acme         = var.acme
  })
}

output "config_toml" {
  description = "The node's config file (portcullis node --config FILE)."
  value       = local.config
}

output "rpc_addr" {
  description = "The address to list this node under in `cluster init --member`."
  value       = "${var.advertise_ip}:${var.ports.cluster}"
}

output "member" {
  description = "This node as a founding member: ID=RPC_ADDR@REGION."
  value       = "${var.node_id}=${var.advertise_ip}:${var.ports.cluster}@${var.region}"
}
