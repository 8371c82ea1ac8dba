// Upstream lane: packed n-bit words in, bfloat16 values (int * scale) out.
//
// A bit pointer walks a window of two buffered words {w1, w0}. Each cycle the lane can emit
// one value: it needs w0 only if the value ends inside w0 (ptr + n <= 16), both words
// otherwise. When the value reaches the end of w0 (ptr + n >= 16) w0 retires and w1 moves
// down; a new word is accepted in the same cycle, so the buffer never starves while words
// arrive and the lane emits one value per cycle for every n.
//
// A job delivers exactly `count` values and reads one packet (up to tlast). A packet that ends
// early is padded with zero bits (ev_short); words beyond the last value are read and dropped
// (ev_long). Pipeline: extract -> int1 | normalise -> norm1b | round to bfloat16 -> bf2 |
// x scale -> FIFO (2 entries).
`default_nettype none
module nc_up_lane (
    input  wire        clk,
    input  wire        rst,
    input  wire        start,       // one-cycle pulse; count_cfg sampled then
    input  wire [4:0]  n,           // job configuration, held stable by the top level
    input  wire [15:0] mask,        // 2^n - 1
    input  wire [15:0] scale,       // bfloat16
    input  wire [31:0] count_cfg,
    input  wire        s_valid,
    input  wire [15:0] s_data,
    input  wire        s_last,
    output wire        s_ready,
    output wire        m_valid,
    output wire [15:0] m_data,
    output wire        m_last,
    input  wire        m_ready,
    output wire        active,      // a job is running or values are still leaving
    output wire        ev_short,
    output wire        ev_long
);
    reg        busy, tl_seen;
    reg [31:0] left;
    reg [15:0] w0, w1;
    reg [1:0]  cnt;
    reg [3:0]  ptr;
    reg        v1, last1, v1b, last1b, v2, last2;
    reg [15:0] int1, bf2;
    reg        sign1b, zero1b;
    reg [3:0]  k1b;
    reg [15:0] norm1b;

    wire        space;
    wire        f_valid;
    wire [5:0]  ptr_n = {2'd0, ptr} + {1'b0, n};
    wire        need2 = (ptr_n > 6'd16);
    wire        have = need2 ? (cnt == 2'd2) : (cnt != 2'd0);
    wire        adv = space || !v2;
    wire        fire = busy && (left != 32'd0) && (have || tl_seen) && adv;
    wire        retire = fire && (ptr_n >= 6'd16);
    wire        draining = busy && (left == 32'd0) && !tl_seen;
    assign s_ready = busy && !tl_seen && (draining || cnt != 2'd2 || retire);
    wire        accept = s_valid && s_ready;
    assign ev_short = fire && !have;
    assign ev_long = (accept && draining) ||
                     (busy && left == 32'd0 && cnt > {1'b0, ptr != 4'd0});

    wire [15:0] value, bf, prod, norm;
    wire        sign, zero;
    wire [3:0]  k;
    nc_extract u_ext (.window({w1, w0}), .ptr(ptr), .mask(mask), .value(value));
    nc_int_norm u_nrm (.value(int1), .sign(sign), .k(k), .norm(norm), .zero(zero));
    nc_int2bf16 u_i2f (.sign(sign1b), .k(k1b), .norm(norm1b), .zero(zero1b), .bf(bf));
    nc_bf16_mul u_mul (.a(bf2), .b(scale), .p(prod));
    nc_fifo #(.WIDTH(17), .DEPTH(2)) u_out (
        .clk(clk), .rst(rst), .push(v2 && adv), .din({last2, prod}), .space(space),
        .valid(f_valid), .dout({m_last, m_data}), .ready(m_ready));
    assign m_valid = f_valid;
    assign active = busy || v1 || v1b || v2 || f_valid;

    always @(posedge clk) begin
        if (rst) begin
            busy <= 1'b0; tl_seen <= 1'b0; left <= 32'd0; cnt <= 2'd0; ptr <= 4'd0;
            w0 <= 16'd0; w1 <= 16'd0; v1 <= 1'b0; v2 <= 1'b0;
            last1 <= 1'b0; last2 <= 1'b0; int1 <= 16'd0; bf2 <= 16'd0; v1b <= 1'b0;
            last1b <= 1'b0; sign1b <= 1'b0; zero1b <= 1'b1; k1b <= 4'd0; norm1b <= 16'd0;
        end else if (start) begin
            busy <= 1'b1; left <= count_cfg;
            tl_seen <= (count_cfg == 32'd0);    // an empty job reads nothing
            cnt <= 2'd0; ptr <= 4'd0; w0 <= 16'd0; w1 <= 16'd0;
        end else begin
            if (busy && left == 32'd0 && tl_seen) busy <= 1'b0;
            if (accept && s_last) tl_seen <= 1'b1;
            if (fire) begin
                left <= left - 32'd1;
                ptr <= ptr_n[3:0];   // ptr + n mod 16
            end
            // word buffer: invalid slots hold zeros, which is the padding of a short packet
            if (accept && !draining) begin
                if (retire) begin
                    if (cnt == 2'd2) begin w0 <= w1; w1 <= s_data; end
                    else begin w0 <= s_data; w1 <= 16'd0; end
                end else begin
                    if (cnt == 2'd0) w0 <= s_data; else w1 <= s_data;
                    cnt <= cnt + 2'd1;
                end
            end else if (retire) begin
                w0 <= w1; w1 <= 16'd0;
                if (cnt != 2'd0) cnt <= cnt - 2'd1;
            end
            if (adv) begin
                v1 <= fire; int1 <= value; last1 <= (left == 32'd1);
                v1b <= v1; sign1b <= sign; k1b <= k; norm1b <= norm; zero1b <= zero;
                last1b <= last1;
                v2 <= v1b; bf2 <= bf; last2 <= last1b;
            end
        end
    end
endmodule
`default_nettype wire
