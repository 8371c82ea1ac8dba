// Quantiser, third stage: round m24 * 2^(e2 - 23) to an integer magnitude, ties to even (as
// torch.round); `big` flags magnitudes of 2^16 and more, which saturate at every width.
`default_nettype none
module nc_quant_int (
    input  wire [23:0] m24,
    input  wire [10:0] e2,       // two's complement
    output reg  [16:0] mag,
    output reg         big
);
    reg [39:0] t;
    always @(*) begin
        // t = value * 2^24, valid for e2 in -1..15
        big = !e2[10] && (e2 >= 11'd16);
        t = 40'd0;
        mag = 17'd0;
        if (!big && (!e2[10] || e2 == 11'h7FF)) begin       // e2 >= -1
            t = {16'd0, m24} << (e2[4:0] + 5'd1);
            mag = {1'b0, t[39:24]} + {16'd0, t[23] & ((|t[22:0]) | t[24])};
        end
    end
endmodule
`default_nettype wire
