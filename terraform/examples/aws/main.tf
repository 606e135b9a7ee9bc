# Three gateway nodes in one AWS region (one per availability zone), from modules/cluster.
# For several regions, repeat the instances per region with a provider alias each and list every
# node in the one `module "portcullis"` call; the cluster port must then be reachable between
# regions (VPC peering or a transit gateway).
#
# Not applied in CI: CI machines cannot download the AWS provider. `terraform fmt` checks its
# syntax there; run `terraform init && terraform validate` where the registry is reachable.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "subnet_ids" {
  description = "Three subnets (one per AZ) of an existing VPC."
  type        = list(string)
}

variable "private_ips" {
  description = "One free private address in each subnet, known before the hosts exist."
  type        = list(string)
}

variable "vpc_cidr" {
  type = string
}

variable "ami" {
  description = "A Debian 12 image with /usr/local/bin/portcullis, or set install_command."
  type        = string
}

variable "install_command" {
  type    = string
  default = "test -x /usr/local/bin/portcullis"
}

variable "base_domains" {
  type = list(string)
}

variable "pki_dir" {
  description = "Output of `portcullis cluster init --pki DIR --node-id 1,2,3`."
  type        = string
}

provider "aws" {
  region = var.region
}

data "aws_subnet" "node" {
  count = 3
  id    = var.subnet_ids[count.index]
}

module "portcullis" {
  source = "../../modules/cluster"
  nodes = [for i in range(3) : {
    id           = i + 1
    region       = var.region
    advertise_ip = var.private_ips[i]
  }]
  base_domains    = var.base_domains
  pki_dir         = var.pki_dir
  install_command = var.install_command
  acme            = { contact = [] }
}

resource "aws_security_group" "gateway" {
  name_prefix = "portcullis-"
  vpc_id      = data.aws_subnet.node[0].vpc_id

  ingress {
    description = "HTTPS and HTTP/3"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "HTTP/3"
    from_port   = 443
    to_port     = 443
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "HTTP redirect and ACME HTTP-01"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "WireGuard from CVMs"
    from_port   = 51820
    to_port     = 51820
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "Cluster RPC (mutual TLS) inside the VPC only"
    from_port   = 8000
    to_port     = 8000
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }
  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_instance" "gateway" {
  count                  = 3
  ami                    = var.ami
  instance_type          = "c7i.large"
  subnet_id              = var.subnet_ids[count.index]
  private_ip             = var.private_ips[count.index]
  vpc_security_group_ids = [aws_security_group.gateway.id]
  user_data              = module.portcullis.user_data[tostring(count.index + 1)]

  metadata_options {
    http_tokens = "required"
  }
  tags = {
    Name = "portcullis-${count.index + 1}"
  }
}

output "public_ips" {
  value = aws_instance.gateway[*].public_ip
}
